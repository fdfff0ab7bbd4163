"""``modelopt_int8`` / ``modelopt_fp8``: read from NVIDIA ModelOpt's own preset configs.

ModelOpt puts a weight quantizer and an input quantizer on each Linear / Conv (no output
quantizer), calibrates with max (amax), and its stock configs disable quantizers by module-name
glob (the vision tower, ``lm_head``...): those globs become the scheme's ``skip``.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from .spec import QuantSpec, Scheme

EXTRA = "pip install -e '.[modelopt]'"


def _config(cfg_name: str) -> dict[str, Any]:
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise InputError(
            f"scheme from ModelOpt's {cfg_name}: nvidia-modelopt is not installed ({EXTRA})"
        ) from exc
    return getattr(mtq, cfg_name)


def _spec(cfg: dict[str, Any], weight: bool) -> QuantSpec:
    bits, axis = cfg["num_bits"], cfg.get("axis")
    fp8 = isinstance(bits, list | tuple) and tuple(bits) == (4, 3)
    if not fp8 and bits != 8:
        raise InputError(f"ModelOpt quantizer with num_bits {bits}: not a W8A8 scheme")
    return QuantSpec(
        "fp8_e4m3" if fp8 else "int8",
        "channel" if weight and axis == 0 else "tensor",
        symmetric=True,
        dynamic=cfg.get("type") == "dynamic",
        narrow_range=bool(cfg.get("narrow_range", False)),
        scale_rule="amax",
    )


def describe(cfg_name: str, name: str) -> Scheme:
    entries = _config(cfg_name)["quant_cfg"]
    found = {}
    skip = []
    for e in entries:
        pattern = e.get("quantizer_name", "")
        if pattern in ("*weight_quantizer", "*input_quantizer") and "cfg" in e:
            found[pattern] = e["cfg"]
        elif e.get("enable") is False and pattern != "*" and "parent_class" not in e:
            skip.append(pattern)
    return Scheme(
        name=name,
        library="nvidia-modelopt",
        weights=_spec(found["*weight_quantizer"], weight=True),
        inputs=_spec(found["*input_quantizer"], weight=False),
        outputs=None,
        op_types=("Linear", "Conv3d"),
        skip=tuple(skip),
        source=f"modelopt.torch.quantization.{cfg_name}",
        notes=("calibration: max (amax per tensor / per channel)",),
    )
