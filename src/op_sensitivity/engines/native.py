"""Native sensitivity engine: INC's mse_v2 measurements in plain PyTorch, on CPU or GPU.

Why: INC deep-copies the model and re-runs ``prepare_fx``/``convert_fx`` for every op (~1 s/op on
the tiny model, ~45 s/op at 3B width on CPU, no GPU). Here observers are calibrated once per
confidence batch and each trial only toggles fake-quantization on modules: no copy, no tracing.

What is replicated (INC 3.7.1 PyTorch FX defaults on CPU, read from ``pytorch_cpu.yaml``,
``_cfg_to_qconfig`` / ``_observer`` and from the converted sub-graphs it produces for Qwen2.5-VL):

* Linear / Conv3d: weight int8 symmetric per output channel from min/max
  (``PerChannelMinMaxObserver(qint8, per_channel_symmetric)``); input and output activations uint8
  asymmetric per tensor from ``HistogramObserver`` (INC's ``kl`` default), ``reduce_range`` as INC
  decides it (7-bit activations on CPUs without AVX512-VNNI). INC's converted sub-graphs are
  ``quantize(input) -> quantized op -> dequantize`` per module, so each module fake-quantizes its
  input, weight and output; modules reading the same tensor (gate_proj/up_proj) get identical
  input qparams, as INC's shared observer gives them.
* Embedding: weight-only, uint8 per row with float qparams
  (``per_channel_affine_float_qparams``); output fp32.
* Calibration: INC prepares each trial with observers and runs the same batch through a model
  that is still fp32 while observing, so every trial sees fp32 statistics; we observe once per
  batch and reuse the qparams for all trials of that batch.
* Measurement: sum of squared differences at the output of the last op (lm_head) vs fp32.
  ``fallback``: all scored ops quantized but one. ``requant`` ``cumulative``: INC's curve (ops
  quantized one after another in module order, never reverted). ``isolated`` (INC lacks it):
  only this op quantized, a true per-op measure.

Arithmetic (``arithmetic``): ``int8_kernels`` (CPU) runs each enabled op through torch's own
quantized modules (``torch.ao.nn.quantized.Linear`` / ``Conv3d`` on the x86 engine) built from the
same qparams - the kernels INC's converted model calls, so values match INC to the bit where the
inputs match. ``fake_quant`` (any device, the GPU path) quantize-dequantizes input, weight and
output in float: the only difference is the rounding of the int32 -> uint8 requantization step,
measured at 1 LSB in about 0.2 % of a Linear's outputs. INC's "double check" second pass is not
replicated.

Reuse (``reuse``): the vision tower's output is cached while only text ops change, and with
``suffix_reuse`` each decoder layer's and vision block's output while no op before it changed,
so a trial recomputes from the toggled op's block onward; values are those of a full recompute.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_file
from ..errors import InputError
from ..params import SensitivityParams
from ..phases import FALLBACK, REQUANT
from ..schemes import Scheme
from ..schemes import inc as inc_scheme
from ..schemes import load as load_scheme
from .contract import Capture, HelperCall, PassResult, PassSpec
from .distributed import ONE_PROCESS, Shard, check_processes, run_sharded
from .reuse import SuffixCache, vision_cache
from .schemed import SchemeQuant, check_kernels

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_avx512_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """What INC checks (CPUID leaf 7, ECX bit 11) to decide ``reduce_range``, read from Linux's flags."""
    try:
        return "avx512_vnni" in cpuinfo.read_text().split()
    except OSError:
        return False


def resolve_reduce_range(setting: str) -> bool:
    if setting == "auto":
        return not cpu_has_avx512_vnni()
    return setting == "true"


def resolve_device(setting: str, where: str = "sensitivity.native.device") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{where}: cuda requested but no CUDA device is available")
    return torch.device(setting)


def _fq_tensor(x: torch.Tensor, qp: tuple[torch.Tensor, torch.Tensor, int, int]) -> torch.Tensor:
    scale, zero_point, qmin, qmax = qp
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


def fake_quant_weight(weight: torch.Tensor, op_type: str) -> torch.Tensor:
    """The weight INC's quantized module computes with, dequantized (same observer, same rounding)."""
    w = weight.detach().float()
    if op_type == "Embedding":
        # Read the table back through torch's own quantized Embedding kernel (CPU): its row-wise
        # dequantization (q * scale + bias) differs from (q - zp) * scale in the last float bit,
        # and such a bit flips rounding downstream.
        cpu = w.cpu()
        obs = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams
        )
        obs(cpu)
        scale, zero_point = obs.calculate_qparams()
        qweight = torch.quantize_per_channel(cpu, scale, zero_point, 0, torch.quint8)
        table = torch.ao.nn.quantized.Embedding(cpu.shape[0], cpu.shape[1], _weight=qweight)
        return table(torch.arange(cpu.shape[0])).to(weight.device, weight.dtype)
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    ).to(w.device)
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    return torch.fake_quantize_per_channel_affine(
        w, scale.float(), zero_point.to(torch.int32), 0, -128, 127
    ).to(weight.dtype)


def _act_observer(reduce_range: bool) -> torch.ao.quantization.HistogramObserver:
    return torch.ao.quantization.HistogramObserver(
        dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range
    )


def _qparams(obs) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The observer's qparams, searched on the CPU and put back where its histogram was.

    Why: the histogram observer's min/max search walks the bins one scalar comparison at a time;
    on a GPU each comparison is a device sync, which made the calibration of a full-size model
    cost seconds per phase. The search reads only the small histogram, so it runs on the CPU.
    """
    device = obs.histogram.device
    scale, zero_point = obs.cpu().calculate_qparams()
    qmin, qmax = obs.quant_min, obs.quant_max
    return (
        scale.float().reshape(()).to(device),
        zero_point.to(torch.int32).reshape(()).to(device),
        int(qmin),
        int(qmax),
    )


def _quantized_module(op: _Op, weight: torch.Tensor) -> nn.Module:
    """torch's quantized Linear/Conv3d with INC's weight observer and this op's output qparams."""
    mod = op.module
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    )
    w = weight.detach().float().cpu()
    obs(w)
    scale, zero_point = obs.calculate_qparams()
    qweight = torch.quantize_per_channel(w, scale, zero_point, 0, torch.qint8)
    bias = None if mod.bias is None else mod.bias.detach().float().cpu()
    if isinstance(mod, nn.Linear):
        q = torch.ao.nn.quantized.Linear(mod.in_features, mod.out_features, bias_=bias is not None)
    elif isinstance(mod, nn.Conv3d):
        q = torch.ao.nn.quantized.Conv3d(
            mod.in_channels,
            mod.out_channels,
            mod.kernel_size,
            mod.stride,
            mod.padding,
            mod.dilation,
            mod.groups,
            bias is not None,
        )
    else:
        raise InputError(
            f"native engine: int8_kernels arithmetic has no quantized kernel for {op.type} "
            f"({op.name}); use arithmetic fake_quant"
        )
    q.set_weight_bias(qweight, bias)
    q.scale, q.zero_point = float(op.out_qp[0]), int(op.out_qp[1])
    return q


@dataclass
class _Op:
    """One scored module. Its weight stays as stored (a bf16 checkpoint stays bf16, 2 bytes/param);
    the quantized weight is kept compact (int8 + per-channel scale, 1 byte/param; a dequantized
    table for the Embedding, as its weight-only quantization is read); a trial computes with the
    one it needs, cast to the compute dtype for that call only."""

    name: str
    type: str
    module: nn.Module
    param: nn.Parameter  # the module's own weight Parameter, put back by FakeQuantModel.remove
    weight_only: bool
    q_weight: torch.Tensor | None = None  # int8 values (fake_quant) or the dequantized table (Embedding)
    q_scale: torch.Tensor | None = None  # per-output-channel scale, shaped to broadcast over the weight
    in_qp: tuple | None = None
    out_qp: tuple | None = None
    qmodule: nn.Module | None = None  # int8_kernels arithmetic: torch's quantized module for this op
    sq: SchemeQuant | None = None  # a scheme other than inc_cpu: its quantizers for this op
    enabled: bool = False
    observers: dict[str, Any] = field(default_factory=dict)


def _affine(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A Linear's or Conv's computation with the given weight and bias."""
    if isinstance(mod, nn.Linear):
        return F.linear(x, weight, bias)
    return mod._conv_forward(x, weight, bias)  # nn.Conv1d/2d/3d


def _functional(op: _Op, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's own computation, with ``weight`` in place of its stored one."""
    mod = op.module
    if isinstance(mod, nn.Embedding):
        return F.embedding(x, weight, mod.padding_idx, mod.max_norm, mod.norm_type, mod.scale_grad_by_freq)
    return _affine(mod, x, weight, mod.bias)


class FakeQuantModel:
    """Every scored module computes through :meth:`_forward`; ``set(name, on)`` toggles it in O(1).

    Memory: the model's weights as stored plus about one byte per scored parameter, where a
    resident compute-dtype copy of each weight and of its quantized version would take two
    to four times the model (``compute_dtype`` is what the activations and the upcast weights use).
    ``kept`` modules (ops the params keep in full precision) get the same per-call upcast without
    any quantization, so excluding ops never brings a resident compute-dtype copy back.
    While it is active a scored or kept module's ``weight`` is an empty placeholder in the compute dtype:
    transformers reads a tower's dtype from its first weight and casts inputs to it, which must
    not round float32 pixels to a bf16 checkpoint's dtype. Weights are only read, never written,
    so tied weights (lm_head / embed_tokens) need no copy.
    """

    def __init__(
        self,
        model: nn.Module,
        op_names: list[str],
        reduce_range: bool,
        arithmetic: str = "fake_quant",
        compute_dtype: torch.dtype = torch.float32,
        kept: list[str] = (),
        scheme: Scheme | None = None,
    ):
        modules = dict(model.named_modules())
        self.model = model
        self.scheme = scheme or inc_scheme.describe()
        generic = self.scheme.name != "inc_cpu"
        self.reduce_range = reduce_range
        self.arithmetic = arithmetic
        self.compute_dtype = compute_dtype
        self.observing = False
        self.trace: list[str] | None = None  # names of scored ops as they run (SuffixCache.learn)
        self.readers: dict[str, list[str]] = {}  # Scheme.shared_input: the other readers of an op's input
        self._last_read: tuple[str, torch.Tensor] | None = None
        self.ops: dict[str, _Op] = {}
        self.kept: dict[str, _Op] = {}  # never quantized: stored weight, upcast per call
        for name in op_names:
            op = self._wrap(modules[name], name)
            if generic:
                op.sq = SchemeQuant(self.scheme, self._weight(op), arithmetic, op.type)
                op.module.forward = self._scheme_forward(op)
                self.ops[name] = op
                continue
            if arithmetic == "fake_quant" or op.weight_only:
                self._quantize_weight(op)
            op.module.forward = self._forward(op)
            self.ops[name] = op
        for name in kept:
            op = self._wrap(modules[name], name)
            op.module.forward = self._kept_forward(op)
            self.kept[name] = op

    def _wrap(self, mod: nn.Module, name: str) -> _Op:
        """The op with its stored weight; the module's ``weight`` becomes an empty placeholder."""
        op_type = type(mod).__name__
        op = _Op(name, op_type, mod, mod.weight, weight_only=op_type == "Embedding")
        mod.weight = nn.Parameter(
            torch.empty(0, dtype=self.compute_dtype, device=op.param.device), requires_grad=False
        )
        return op

    def _weight(self, op: _Op) -> torch.Tensor:
        """The stored weight in the compute dtype: a copy for this call only when the dtypes differ."""
        return op.param.detach().to(self.compute_dtype)

    def _quantize_weight(self, op: _Op) -> None:
        """INC's weight quantization of this op, kept compact; bit-identical to a resident fake-quant copy."""
        w = self._weight(op)
        fq = fake_quant_weight(w, op.type)
        if op.weight_only:
            op.q_weight = fq
            return
        w32 = w.float()
        obs = torch.ao.quantization.PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        ).to(w32.device)
        obs(w32)
        scale = obs.calculate_qparams()[0].float().reshape(-1, *([1] * (w.dim() - 1)))
        op.q_weight = torch.round(fq.float() / scale).to(torch.int8)  # exact: fq is an int8 multiple of scale
        op.q_scale = scale

    def _dequantized(self, op: _Op) -> torch.Tensor:
        if op.weight_only:
            return op.q_weight
        # int8 x float32 promotes in one kernel: the same products as q.float() * scale, one
        # weight-sized temporary fewer per call
        return (op.q_weight * op.q_scale).to(self.compute_dtype)

    def _forward(self, op: _Op):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.trace is not None:
                self.trace.append(op.name)
            if self.observing:
                if not op.weight_only:
                    op.observers["in"](x.detach().float())
                out = _functional(op, x, self._weight(op))
                if not op.weight_only:
                    op.observers["out"](out.detach().float())
                return out
            if not op.enabled:
                return _functional(op, x, self._weight(op))
            if op.qmodule is not None:
                scale, zero_point = float(op.in_qp[0]), int(op.in_qp[1])
                q = torch.quantize_per_tensor(x.float(), scale, zero_point, torch.quint8)
                return op.qmodule(q).dequantize()
            if op.weight_only:
                return _functional(op, x, self._dequantized(op))
            out = _functional(op, _fq_tensor(x, op.in_qp), self._dequantized(op))
            return _fq_tensor(out, op.out_qp)

        return forward

    def _scheme_forward(self, op: _Op):
        call = functools.partial(_affine, op.module)

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.trace is not None:
                self.trace.append(op.name)
            if self.observing:
                self._note_reader(op.name, x)
            shared = not op.enabled and any(self.ops[s].enabled for s in self.readers.get(op.name, ()))
            return op.sq.run(
                call,
                x,
                functools.partial(self._weight, op),
                op.module.bias,
                quant_in=shared,
                quant_op=op.enabled,
                observing=self.observing,
                dtype=self.compute_dtype,
            )

        return forward

    def _note_reader(self, name: str, x: torch.Tensor) -> None:
        """Ops reading one tensor (q/k/v, gate/up: called one after another on the same object)
        share its input quantizer where the scheme puts one per tensor (``Scheme.shared_input``)."""
        if not self.scheme.shared_input:
            return
        last = self._last_read
        if last is not None and last[1] is x:
            group = sorted({name, last[0], *self.readers.get(last[0], ())})
            for member in group:
                self.readers[member] = [m for m in group if m != member]
        self._last_read = (name, x)

    def _kept_forward(self, op: _Op):
        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return _functional(op, x, self._weight(op))

        return forward

    def set(self, name: str, on: bool) -> None:
        self.ops[name].enabled = on

    def set_all(self, on: bool) -> None:
        for name in self.ops:
            self.set(name, on)

    def state(self, names: list[str]) -> tuple[bool, ...]:
        return tuple(self.ops[n].enabled for n in names)

    @torch.no_grad()
    def calibrate(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """fp32 forwards with fresh observers, then fix the qparams.

        One batch per call in the sensitivity pass (what every INC trial sees); the whole
        calibration sample when a keep-list is validated (what INC's PTQ sees).
        """
        self.set_all(False)
        for op in self.ops.values():
            if op.sq is not None:
                op.sq.start()
            elif not op.weight_only:
                dev = op.param.device
                op.observers = {
                    "in": _act_observer(self.reduce_range).to(dev),
                    "out": _act_observer(self.reduce_range).to(dev),
                }
        self.observing = True
        self.readers = {}
        try:
            for batch in batches:
                self.model(**batch)
        finally:
            self.observing = False
            self._last_read = None
        for op in self.ops.values():
            if op.sq is not None:
                op.sq.freeze(op.name)
            elif not op.weight_only:
                if op.observers["in"].min_val.numel() == 0 or not torch.isfinite(op.observers["in"].min_val):
                    raise InputError(
                        f"native engine: op {op.name} did not run on the calibration batch "
                        "(keep it fp32 with sensitivity.op_name_dict)"
                    )
                op.in_qp, op.out_qp = _qparams(op.observers["in"]), _qparams(op.observers["out"])
                op.observers = {}
                if self.arithmetic == "int8_kernels":
                    op.qmodule = _quantized_module(op, self._weight(op))

    def remove(self) -> None:
        for op in [*self.ops.values(), *self.kept.values()]:
            if "forward" in vars(op.module):
                del op.module.forward
            op.module.weight = op.param
        self.set_all(False)


def _status_gib(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in GiB; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except OSError:
        pass


def current_rss_gib() -> float | None:
    """This process's resident memory now, to tell a pass's own peak from what came before."""
    return _status_gib("VmRSS")


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS counter (VmHWM) over, so the pass's peak excludes loading.

    The CPU twin of ``torch.cuda.reset_peak_memory_stats``: loading a checkpoint or building a
    random model can peak above the pass itself. Linux only; elsewhere the peak is the process's.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
    return None


def peak_memory(device: torch.device, rss_reset: bool) -> dict[str, Any]:
    """The pass's peak: GPU memory allocated on CUDA; on CPU the resident set since
    :func:`reset_peak_rss` (``peak_rss_scope: pass``) or, where it could not be reset, the process's."""
    if device.type == "cuda":
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
    hwm = _status_gib("VmHWM") if rss_reset else None
    if hwm is not None:
        return {"peak_rss_gib": hwm, "peak_rss_scope": "pass"}
    return {
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "peak_rss_scope": "process",
    }


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
    reduce_range = resolve_reduce_range(n.reduce_range)
    return Numerics(dev, n.dtype, reduce_range, arithmetic, n.allow_tf32, scheme)


def check_native_processes(params: SensitivityParams) -> None:
    """``sensitivity.native.processes`` against this machine's cores (cpu) or GPUs (cuda)."""
    n, where = params.native, params.where
    check_processes(n.processes, resolve_device(n.device, where("native.device")), where("native.processes"))


TRIAL_LOG = "native_trials.jsonl"


class TrialLog:
    """Every trial's value, appended the moment it is measured, so a killed pass resumes.

    The file (``<workspace>/native_trials.jsonl``) opens with the pass's fingerprint
    (:meth:`PassSpec.fingerprint`): values are reused only by a pass of the same model, batches,
    params, engine and numerics; a log of another pass is said to be ignored and is replaced.
    A line cut short by a kill ends the reusable part. JSON floats round-trip exactly, so a
    resumed pass reports the same bytes as an uninterrupted one.
    """

    def __init__(self, path: Path | None, fingerprint: str):
        self.values: dict[tuple, float] = {}
        self.resumed = 0
        self.file = None
        if path is None:
            return
        if path.exists():
            lines = path.read_text().splitlines()
            head = _json_line(lines[0]) if lines else None
            if head is not None and head.get("fingerprint") == fingerprint:
                for line in lines[1:]:
                    rec = _json_line(line)
                    if rec is None:
                        break
                    self.values[tuple(rec["key"])] = rec["value"]
                log.info("resuming from %s: %d trials already measured by this pass", path, len(self.values))
            elif head is not None:
                log.warning("ignoring %s: it belongs to another pass (its fingerprint differs)", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(
                "".join(json.dumps(r) + "\n" for r in [{"fingerprint": fingerprint}, *self._records()])
            )
        self.file = path.open("a")

    def _records(self) -> list[dict]:
        return [{"key": list(k), "value": v} for k, v in self.values.items()]

    def get(self, key: tuple) -> float | None:
        value = self.values.get(key)
        self.resumed += value is not None
        return value

    def put(self, key: tuple, value: float) -> None:
        self.values[key] = value
        if self.file is not None:
            self.file.write(json.dumps({"key": list(key), "value": value}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _json_line(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def pass_fingerprint(spec: PassSpec, num: Numerics) -> str:
    """What a trial log must match to be resumed: the spec's and the numerics that shape values."""
    return spec.fingerprint("native", {**num.details(), "reduce_range": num.reduce_range})


def run_pass(
    model: nn.Module,
    spec: PassSpec,
    *,
    workspace: Path | None = None,
    on_call: Callable[[Capture], None] | None = None,
    shard: Shard = ONE_PROCESS,
) -> PassResult | None:
    """Both phases over the spec's confidence batches; same op set and order as the INC engine.

    Every trial's value goes to the workspace's :class:`TrialLog` as it is measured (when the
    spec names its model); a rerun of the same pass after a kill measures only what is missing.
    ``on_call`` runs after each phase x batch (once at the end with several processes).
    With ``native.processes`` > 1 the pass runs sharded (:mod:`.distributed`); a worker process
    runs its ``shard`` and gets None back except on rank 0.
    """
    num = resolve_numerics(spec.params)
    n = spec.params.native
    if n.processes > 1 and shard.world == 1:
        with contextlib.ExitStack() as scratch:
            if workspace is None:  # the workers' trial logs, for this call only
                workspace = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="op_sensitivity_")))
            result = run_sharded(run_pass, model, spec, workspace, num.device)
        if on_call is not None:
            on_call(result.capture)
        return result
    op_types = dict(spec.ops)
    scored = [name for name, _ in spec.scored]
    resumable = workspace is not None and spec.model_sha256 is not None
    log_name = TRIAL_LOG if shard.world == 1 else f"native_trials.{shard.rank}of{shard.world}.jsonl"
    trials = TrialLog(workspace / log_name if resumable else None, pass_fingerprint(spec, num))
    rss_reset = reset_peak_rss()
    rss_at_start = current_rss_gib()
    kept = [e.op_name for e in spec.excluded]
    model = num.prepare(model, {*scored, *kept})
    last = spec.module_order[-1]
    fq = FakeQuantModel(model, scored, num.reduce_range, num.arithmetic, num.dtype, kept, num.scheme)
    captured: dict[str, torch.Tensor] = {}
    last_module = dict(model.named_modules())[last]
    grab = last_module.register_forward_hook(lambda _m, _a, out: captured.__setitem__("out", out.detach()))
    capture, seconds, all_int8 = Capture(), {FALLBACK: 0.0, REQUANT: 0.0}, []
    batch_key = [0]
    suffix = SuffixCache(model, fq, batch_key) if n.suffix_reuse else None

    def keep_outputs(on: bool) -> None:
        """Store the block outputs of the forwards to come (the base states and the cumulative curve)."""
        if suffix is not None:
            suffix.record = on

    def error(batch, ref) -> float:
        model(**batch)
        return float((captured["out"].float() - ref).pow(2).sum())

    trial_seconds: dict[str, dict[str, float]] = {FALLBACK: {}, REQUANT: {}, "all_int8": {}}
    calibration_seconds: list[float] = []

    def trial(key: tuple, batch: dict, ref: torch.Tensor) -> float:
        value = trials.get(key)
        if value is None:
            start = time.perf_counter()
            value = error(batch, ref)
            phase, _, name = key
            times = trial_seconds[phase]
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            trials.put(key, value)
        return value

    def record(phase: str, b: int, values: list, start: float) -> None:
        values = shard.gather(values, scored)
        elapsed = time.perf_counter() - start
        seconds[phase] += elapsed
        if values is None:  # not rank 0
            return
        capture.calls.append(_call(phase, b, values, elapsed))
        if on_call is not None:
            on_call(capture)

    try:
        with torch.no_grad(), vision_cache(model, fq, batch_key):
            for b, raw in enumerate(spec.batches):
                batch = num.batch(raw)
                batch_key[0] = b
                keys = [("all_int8", b, "")] + [(p, b, name) for p in (FALLBACK, REQUANT) for name in scored]
                start = time.perf_counter()  # calibration counts: INC pays it in every trial
                ref = None
                keep_outputs(True)
                if not all(k in trials.values for k in keys):  # a batch measured whole needs no forward
                    if suffix is not None:
                        suffix.clear()
                    with (
                        suffix.learn()
                        if suffix is not None and not suffix.prefix
                        else contextlib.nullcontext()
                    ):
                        fq.calibrate([batch])
                    fq.set_all(False)
                    model(**batch)  # the fp32 reference, stored as the requant base
                    ref = captured["out"].float()
                    calibration_seconds.append(time.perf_counter() - start)
                fq.set_all(True)
                logged = ("all_int8", b, "") in trials.values
                all_int8.append(trial(("all_int8", b, ""), batch, ref))  # its forward: the fallback base
                if (
                    suffix is not None
                    and logged
                    and any((FALLBACK, b, o) not in trials.values for o in scored)
                ):
                    model(**batch)  # the all-int8 trial came from the log: store the base anyway
                keep_outputs(False)
                values = []
                for name in tqdm(shard.dealt(scored), desc=f"native fallback batch {b}", leave=False):
                    fq.set(name, False)
                    values.append(((name, op_types[name]), trial((FALLBACK, b, name), batch, ref)))
                    fq.set(name, True)
                record(FALLBACK, b, values, start)
                start = time.perf_counter()
                fq.set_all(False)
                cumulative = n.requant_mode == "cumulative"
                keep_outputs(cumulative)
                if cumulative:
                    first, mine = shard.segment(scored)
                    for name in scored[:first]:  # where INC's curve is when this segment starts
                        fq.set(name, True)
                else:
                    mine = shard.dealt(scored)
                values = []
                for name in tqdm(mine, desc=f"native requant ({n.requant_mode}) batch {b}", leave=False):
                    fq.set(name, True)
                    values.append(((name, op_types[name]), trial((REQUANT, b, name), batch, ref)))
                    if not cumulative:
                        fq.set(name, False)
                record(REQUANT, b, values, start)
                log.info(
                    "native batch %d: %d ops x 2 phases in %.2fs",
                    b,
                    len(scored),
                    sum(c.seconds for c in capture.calls[-2:]),
                )
    finally:
        grab.remove()
        if suffix is not None:
            suffix.remove()
        fq.remove()
        trials.close()
    runtime = {
        "seconds": seconds,
        "seconds_per_op": sum(seconds.values()) / (2 * spec.confidence_batches * len(scored)),
        "trials_resumed": trials.resumed,
        "blocks_reused": suffix.hits if suffix is not None else 0,
        "blocks_run": suffix.runs if suffix is not None else None,
        # measured trials only (resumed ones cost nothing), summed over batches; the
        # calibration forward and the fp32 reference of each batch that needed them
        "trial_seconds": trial_seconds,
        "calibration_seconds": calibration_seconds,
        "rss_at_start_gib": rss_at_start,
        **peak_memory(num.device, rss_reset),
    }
    ranks = shard.gather_runtime(runtime)
    if ranks is None:
        return None
    types_used = sorted({op_types[name] for name in scored})
    conv = (
        "Conv3d quantized (fake-quant; no forward patch needed)"
        if "Conv3d" in types_used
        else "no Conv3d scored"
    )
    return PassResult(
        capture,
        list(spec.ops),
        list(spec.excluded),
        last,
        conv,
        _quantization(num, types_used),
        engine="native",
        requant_mode=n.requant_mode,
        all_int8_mse=sum(all_int8) / len(all_int8),
        details=num.details(),
        runtime=merge_runtimes(ranks),
        scheme=num.scheme,
    )


def _quantization(num: Numerics, types_used: list[str]) -> dict[str, Any]:
    """The report's per-op-type scheme: INC's vocabulary for inc_cpu, the scheme's specs otherwise."""
    if num.scheme.name == "inc_cpu":
        return {
            "reduce_range": num.reduce_range,
            "by_op_type": {t: inc_scheme.by_op_type(t) for t in types_used},
        }
    s = num.scheme
    specs = {"weight": s.weights, "input": s.inputs, "output": s.outputs}
    return {
        "scheme": s.name,
        "by_op_type": {
            t: {k: None if v is None else asdict(v) for k, v in specs.items()} for t in types_used
        },
    }


def merge_runtimes(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass's runtime from its processes': rank 0's wall seconds, summed counts, the top peak."""
    merged = dict(ranks[0])
    if len(ranks) == 1:
        return merged
    for key in ("trials_resumed", "blocks_reused", "blocks_run"):
        merged[key] = None if merged[key] is None else sum(r[key] for r in ranks)
    for key in ("rss_at_start_gib", "peak_rss_gib", "peak_gpu_memory_gib"):
        if key in merged:
            merged[key] = max(r[key] for r in ranks)
    merged["trial_seconds"] = {
        phase: {name: t for r in ranks for name, t in r["trial_seconds"][phase].items()}
        for phase in merged["trial_seconds"]
    }
    merged["processes"] = len(ranks)
    return merged


def _call(phase: str, batch: int, values: list, seconds: float) -> HelperCall:
    return HelperCall(
        phase,
        batch,
        main=values,
        returned=[k for k, _ in sorted(values, key=lambda kv: kv[1])],
        seconds=seconds,
    )
