"""One quantize-dequantize for every scheme (:class:`~.spec.QuantSpec`), in the tools' own order
of operations, so that each scheme's values equal its tool's to the bit (tests/schemes).

A quantized tensor is its codes (int8 / uint8 / float8_e4m3fn, one byte per element) plus the
:class:`QParams` that map them back: the sensitivity pass keeps a weight as codes, and the
low-precision kernels (``torch._int_mm``, ``torch._scaled_mm``) take the codes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import QuantSpec

FP8_MAX = 448.0  # largest finite float8_e4m3fn
CODE_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn}


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


class MinMax:
    """A static range over several calibration tensors (running min and max): what ModelOpt's max
    calibration (amax = max |x|) and ONNX Runtime's MinMax calibrator both reduce to."""

    def __init__(self, spec: QuantSpec):
        self.spec = spec
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:
        lo, hi = observe(x, self.spec)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    @property
    def seen(self) -> bool:
        return self.lo is not None and bool(torch.isfinite(self.lo).all() and torch.isfinite(self.hi).all())


@dataclass(frozen=True)
class QParams:
    """How codes map back to values. ``amax`` rule: value = code / mult (fp8: code * (1 / mult));
    ``range`` rule: value = (code - zero_point) * scale."""

    spec: QuantSpec
    mult: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    @property
    def step(self) -> torch.Tensor:
        """The value of one code step (what a low-precision kernel multiplies its accumulator by)."""
        return self.scale if self.mult is None else 1 / self.mult


def qparams(spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> QParams:
    lo, hi = lo.float(), hi.float()
    if spec.scale_rule == "amax":
        amax = torch.maximum(lo.abs(), hi.abs())
        if spec.dtype == "fp8_e4m3":
            safe = torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(amax), amax)
            return QParams(spec, mult=FP8_MAX / safe)
        # a tensor numerator, as ModelOpt writes it: ``127.0 / t`` is torch's reciprocal(t) * 127,
        # which differs from a true division in the last bit. An all-zero range keeps zeros exact.
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        return QParams(spec, mult=torch.tensor(float(qrange(spec)[1]), device=amax.device) / amax)
    scale, zero_point = range_qparams(lo, hi, spec)
    return QParams(spec, scale=scale, zero_point=zero_point)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """The codes of ``x`` (one byte each)."""
    spec, x = qp.spec, x.float()
    if spec.dtype == "fp8_e4m3":
        return (x * qp.mult).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    qmin, qmax = qrange(spec)
    if qp.mult is not None:
        q = torch.clamp(torch.round(x * qp.mult), qmin, qmax)
    else:
        q = torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qmin, qmax)
    return q.to(CODE_DTYPES[spec.dtype])


def dequantize(
    codes: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The codes' values in ``dtype``. ``out``: a float32 tensor of the codes' shape to compute
    them in, in place, with the same operations (``engines.weight_copies``: no fresh pages)."""
    if out is None:
        q = codes.float()
        if qp.spec.dtype == "fp8_e4m3":
            return (q * (1 / qp.mult)).to(dtype)
        if qp.mult is not None:
            return (q / qp.mult).to(dtype)
        return ((q - qp.zero_point) * qp.scale).to(dtype)
    q = out.copy_(codes)
    if qp.spec.dtype == "fp8_e4m3":
        q.mul_(1 / qp.mult)
    elif qp.mult is not None:
        q.div_(qp.mult)
    else:
        q.sub_(qp.zero_point).mul_(qp.scale)
    return q.to(dtype)


def fake_quant(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x`` quantized and dequantized with the range [lo, hi] (observed, or ``x``'s own when dynamic)."""
    qp = qparams(spec, lo, hi)
    return dequantize(quantize(x, qp), qp, x.dtype)


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
    scale_wide = torch.where(scale_wide == 0, torch.ones_like(scale_wide), scale_wide)  # all-zero range
    if spec.symmetric:
        zero_point = torch.full_like(scale_wide, float(round((qmin + qmax) / 2)))
    else:
        zero_point = torch.round(qmin - lo.to(wide) / scale_wide)
    return scale_wide.float(), zero_point.float()
