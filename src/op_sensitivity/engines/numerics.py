"""How the native engine computes: device, dtype, arithmetic and INC's ``reduce_range``, resolved once.

Why one object: every value a pass reports is a function of these settings and of this machine
(VNNI decides ``reduce_range``, CUDA decides the device), so they are resolved and checked before
any work, recorded in the report (:meth:`Numerics.details`) and part of a trial log's fingerprint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..params import SensitivityParams
from ..schemes import Scheme
from ..schemes import inc_cpu as inc_scheme
from ..schemes import load as load_scheme
from .cpu_kind import cpu_has_avx512_vnni
from .distributed import check_processes
from .schemed import check_kernels

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_reduce_range(setting: str) -> bool:
    if setting == "auto":
        return not cpu_has_avx512_vnni()
    return setting == "true"


def resolve_device(setting: str, where: str = "sensitivity.native.device") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"{where}: cuda requested but no CUDA device is available (set it to auto or cpu, or run "
            "on a GPU machine)"
        )
    return torch.device(setting)


def _resolve_arithmetic(arithmetic: str, dev: torch.device, dtype: str, scheme: Scheme, where: str) -> str:
    """inc_cpu: torch's quantized modules where they run (cpu, float32), as INC's converted model.
    Another scheme: fake-quant unless a kernel is asked for (``auto`` keeps the tools' own reference
    numerics, which tests/schemes holds to the bit)."""
    if scheme.name != "inc_cpu":
        if arithmetic == "auto":
            return "fake_quant"
        check_kernels(scheme, arithmetic, where)
        return arithmetic
    if arithmetic == "fp8_kernels":
        raise InputError(f"{where}: fp8_kernels needs an fp8 scheme; inc_cpu is int8 (use int8_kernels)")
    if arithmetic == "auto":
        return "int8_kernels" if dev.type == "cpu" and dtype == "float32" else "fake_quant"
    if arithmetic == "int8_kernels" and (dev.type != "cpu" or dtype != "float32"):
        raise InputError(
            f"{where}: int8_kernels runs on cpu in float32 only (device {dev.type}, dtype {dtype}); "
            "use fake_quant"
        )
    return arithmetic


@dataclass(frozen=True)
class Numerics:
    """How the native engine computes, resolved from ``sensitivity.native`` and this machine."""

    device: torch.device
    dtype_name: str
    reduce_range: bool
    arithmetic: str
    allow_tf32: bool
    scheme: Scheme = field(default_factory=inc_scheme.describe)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def details(self) -> dict[str, Any]:
        """What shapes the numbers, for the report (device type, not the host's device index)."""
        return {
            "device": str(self.device),
            "dtype": self.dtype_name,
            "allow_tf32": self.allow_tf32,
            "arithmetic": self.arithmetic,
            "scheme": self.scheme.name,
        }

    def prepare(self, model: nn.Module, scored: set[str] = frozenset()) -> nn.Module:
        """The model on this device, TF32 set as asked, peak-memory counter reset.

        Every parameter and buffer takes the compute dtype except the weights of the ``scored``
        modules, which stay as stored (``FakeQuantModel`` casts them per call): a bf16 checkpoint
        computed in float32 never holds a float32 copy of its big weights, and its numbers are
        those of a model upcast whole (bf16 -> float32 is exact).
        """
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.allow_tf32
            torch.backends.cudnn.allow_tf32 = self.allow_tf32
            torch.cuda.reset_peak_memory_stats(self.device)
        for name, module in model.named_modules():
            for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                dtype = (
                    self.dtype if t.is_floating_point() and not (name in scored and key == "weight") else None
                )
                moved = t.data.to(device=self.device, dtype=dtype)
                if moved is not t.data:
                    t.data = moved
        return model.eval()

    def batch(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in raw.items()
        }


def resolve_numerics(params: SensitivityParams) -> Numerics:
    """Check ``sensitivity.native`` against this machine before any work; warn on reduced precision."""
    n, where = params.native, params.where
    dev = resolve_device(n.device, where("native.device"))
    scheme = load_scheme(n.scheme, where("native.scheme"))
    arithmetic = _resolve_arithmetic(n.arithmetic, dev, n.dtype, scheme, where("native.arithmetic"))
    if n.dtype != "float32":
        log.warning(
            "native engine in %s: its rounding is as large as int8 noise (on the tiny model bf16 gave "
            "fallback Spearman 0.61 vs INC); crosscheck against float32 before trusting it",
            n.dtype,
        )
    check_tf32(params, dev)
    check_screening(params, dev)
    reduce_range = resolve_reduce_range(n.reduce_range)
    return Numerics(dev, n.dtype, reduce_range, arithmetic, n.allow_tf32, scheme)


def check_tf32(params: SensitivityParams, dev: torch.device) -> None:
    """TF32 is a CUDA matmul mode: on a CPU ``allow_tf32: true`` would change nothing computed but
    the report's recorded numerics (so its bytes), as ``screening: tf32`` there is refused."""
    if params.native.allow_tf32 and dev.type != "cuda":
        raise InputError(
            f"{params.where('native.allow_tf32')}: TF32 is a CUDA matmul mode (device {dev.type}); "
            "set it false on a CPU"
        )


def check_screening(params: SensitivityParams, dev: torch.device) -> None:
    """Screening refines in float32: the pass itself must compute in float32, on one process."""
    n, where = params.native, params.where
    if n.screening == "none":
        return
    if n.dtype != "float32" or n.allow_tf32:
        raise InputError(
            f"{where('native.screening')}: {n.screening} screening refines in float32, so the pass must "
            f"compute in float32 (dtype float32, allow_tf32 false); got dtype {n.dtype}, allow_tf32 "
            f"{str(n.allow_tf32).lower()}"
        )
    if n.screening == "first_order" and n.requant_mode != "cumulative":
        raise InputError(
            f"{where('native.screening')}: first_order estimates INC's cumulative requant curve; set "
            f"{where('native.requant_mode')} to cumulative or screening to none"
        )
    if n.screening == "tf32" and dev.type != "cuda":
        raise InputError(
            f"{where('native.screening')}: tf32 is a CUDA matmul mode (device {dev.type}); use bfloat16 "
            "on a CPU"
        )
    if n.processes > 1:
        raise InputError(
            f"{where('native.screening')}: screening runs on one process (processes {n.processes}); set "
            f"{where('native.processes')} to 1 or screening to off"
        )


def check_native_processes(params: SensitivityParams) -> None:
    """``sensitivity.native.processes`` against this machine's cores (cpu) or GPUs (cuda)."""
    n, where = params.native, params.where
    check_processes(n.processes, resolve_device(n.device, where("native.device")), where("native.processes"))
