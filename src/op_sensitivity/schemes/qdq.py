"""One quantize-dequantize for every scheme (:class:`~.spec.QuantSpec`), in the tools' own order
of operations, so that each scheme's values equal its tool's to the bit (tests/schemes)."""

from __future__ import annotations

import torch

from .spec import QuantSpec

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def qrange(spec: QuantSpec) -> tuple[int, int]:
    if spec.dtype == "uint8":
        return 0, 255
    return (-127 if spec.narrow_range else -128), 127


def observe(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max at the spec's granularity, shaped to broadcast over ``x``."""
    x = x.detach().float()
    if spec.granularity == "tensor":
        return x.min(), x.max()
    dims = tuple(range(1, x.dim())) if spec.granularity == "channel" else (-1,)
    return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)


def fake_quant(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x`` quantized and dequantized with the range [lo, hi] (observed, or ``x``'s own when dynamic)."""
    dtype = x.dtype
    x = x.float()
    lo, hi = lo.float(), hi.float()
    if spec.scale_rule == "amax":
        amax = torch.maximum(lo.abs(), hi.abs())
        if spec.dtype == "fp8_e4m3":
            safe = torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(amax), amax)
            mult = FP8_MAX / safe
            y = (x * mult).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * (1 / mult)
            return y.to(dtype)
        qmin, qmax = qrange(spec)
        # a tensor numerator, as ModelOpt writes it: ``127.0 / t`` is torch's reciprocal(t) * 127,
        # which differs from a true division in the last bit
        mult = torch.tensor(float(qmax), device=amax.device) / amax
        y = torch.clamp(torch.round(x * mult), qmin, qmax) / mult
        return y.to(dtype)
    scale, zero_point = range_qparams(lo, hi, spec)
    qmin, qmax = qrange(spec)
    q = torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).to(dtype)


def range_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = (max - min) / (qmax - qmin) with 0 in the range; zero point as ONNX Runtime rounds it."""
    qmin, qmax = qrange(spec)
    wide = torch.float64 if spec.scale_precision == "float64" else torch.float32
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -amax, amax
    scale_wide = (hi.to(wide) - lo.to(wide)) / (qmax - qmin)
    if spec.symmetric:
        zero_point = torch.full_like(scale_wide, float(round((qmin + qmax) / 2)))
    else:
        zero_point = torch.round(qmin - lo.to(wide) / scale_wide)
    return scale_wide.float(), zero_point.float()
