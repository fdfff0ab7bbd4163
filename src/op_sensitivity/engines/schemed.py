"""One scored op under a deployment scheme other than INC's (:mod:`op_sensitivity.schemes`).

Why a separate path: ``inc_cpu`` reproduces INC to the bit with histogram observers and torch's
quantized modules; every other scheme is a :class:`~op_sensitivity.schemes.Scheme` computed by
the one generic quantize-dequantize that equals each tool's own quantizer (tests/schemes):
weights as codes (one byte each), static activation ranges from min/max calibration (ModelOpt's
max, ONNX Runtime's MinMax), dynamic ones from each call's own tensor (compressed-tensors' per
token), an output quantizer only where the tool puts one (ONNX Runtime's QDQ).

Arithmetic: ``fake_quant`` dequantizes codes and computes in float, as the tools' reference
quantizers do. The kernels compute in the deployed integer or fp8 format: ``int8_kernels`` runs a
Linear through ``torch._int_mm`` (int8 x int8 -> exact int32 sums, then one float rescale per
output, as a W8A8 GEMM epilogue does), ``fp8_kernels`` through ``torch._scaled_mm`` (e4m3 x
e4m3, float32 out). Both need symmetric codes (zero point 0); a Conv3d (the vision patch
embedding) stays on fake-quant, as torch has no such kernel for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from ..schemes import Scheme
from ..schemes.qdq import MinMax, QParams, dequantize, observe, qparams, quantize
from ..schemes.spec import QuantSpec
from .weight_copies import WeightCopies

KERNELS = {"int8_kernels": ("int8",), "fp8_kernels": ("fp8_e4m3",)}


def kernel_for(scheme: Scheme) -> str | None:
    """The low-precision matmul that computes the scheme: symmetric codes of one dtype in both operands."""
    w, x = scheme.weights, scheme.inputs
    if x is None or not (w.symmetric and x.symmetric) or w.dtype != x.dtype:
        return None
    return next((k for k, dtypes in KERNELS.items() if w.dtype in dtypes), None)


def check_kernels(scheme: Scheme, arithmetic: str, where: str) -> None:
    """The kernels take symmetric codes of their own dtype: say so before any work."""
    if arithmetic in KERNELS and kernel_for(scheme) != arithmetic:
        raise InputError(
            f"{where}: {arithmetic} needs symmetric {'/'.join(KERNELS[arithmetic])} weights and inputs; "
            f"scheme {scheme.name} has weights {scheme.weights.dtype} and inputs "
            f"{scheme.inputs.dtype if scheme.inputs else None} (symmetric "
            f"{scheme.inputs.symmetric if scheme.inputs else None}); use fake_quant"
        )


class SchemeQuant:
    """The quantizers of one op: weight codes, input and output activation quantizers."""

    def __init__(
        self,
        scheme: Scheme,
        weight: torch.Tensor,
        arithmetic: str,
        op_type: str,
        copies: WeightCopies | None = None,
    ):
        self.scheme = scheme
        self.copies = copies  # where the per-call dequantized weight is written (weight_copies)
        self.op_type = op_type
        self.kernel = arithmetic if arithmetic in KERNELS and op_type == "Linear" else None
        w = weight.detach().float()
        self.w_qp = qparams(scheme.weights, *observe(w, scheme.weights))
        self.w_codes = quantize(w, self.w_qp)
        # the activation quantizers the scheme has: input, and output where the tool requantizes
        self.specs: dict[str, QuantSpec] = {
            k: v for k, v in (("in", scheme.inputs), ("out", scheme.outputs)) if v is not None
        }
        self.observers: dict[str, MinMax] = {}
        self.static: dict[str, QParams] = {}

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.copies is not None:
            return self.copies.dequantized(self.w_codes, self.w_qp, dtype)
        return dequantize(self.w_codes, self.w_qp, dtype)

    def start(self) -> None:
        """Fresh min/max observers for the static activation quantizers."""
        self.observers = {k: MinMax(spec) for k, spec in self.specs.items() if not spec.dynamic}
        self.static = {}

    def observe(self, where: str, x: torch.Tensor) -> None:
        if where in self.observers:
            self.observers[where](x)

    def freeze(self, name: str) -> None:
        for where, obs in self.observers.items():
            if not obs.seen:
                raise InputError(
                    f"native engine: op {name} did not run on the calibration batch "
                    "(keep it fp32 with sensitivity.op_name_dict)"
                )
            self.static[where] = qparams(obs.spec, obs.lo, obs.hi)
        self.observers = {}

    def _qp(self, where: str, x: torch.Tensor) -> QParams:
        spec = self.specs[where]
        return qparams(spec, *observe(x, spec)) if spec.dynamic else self.static[where]

    def act(self, where: str, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize an activation, or leave it where the scheme has no quantizer there."""
        if where not in self.specs:
            return x
        qp = self._qp(where, x)
        return dequantize(quantize(x, qp), qp, x.dtype)

    def _bias_after_output(self, x: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """torch.onnx writes a Linear on a 3-D input as MatMul + Add: the output Q/DQ precedes the bias."""
        return (
            self.scheme.bias == "onnx_export"
            and bias is not None
            and self.op_type == "Linear"
            and x.dim() > 2
        )

    def _int32_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The bias as ONNX Runtime stores it for a Gemm / Conv: int32 at input scale x weight scale."""
        step = (self.static["in"].step * self.w_qp.step.reshape(-1)).float()
        return (torch.round(bias.float() / step) * step).to(bias.dtype)

    def run(
        self,
        fn: Callable,
        x: torch.Tensor,
        weight: Callable[[], torch.Tensor],
        bias: torch.Tensor | None,
        *,
        quant_in: bool,
        quant_op: bool,
        observing: bool,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The op ``fn(x, weight(), bias)`` with the scheme's quantizers where they are on.

        ``quant_op``: this op is quantized (input, weight, output); ``quant_in`` alone: it is kept
        in high precision but reads a tensor whose shared quantizer is on (``Scheme.shared_input``).
        ``weight`` gives the high-precision weight: called only where it is used, so a quantized
        call never also builds the compute-dtype copy of the stored weight (for a 3B-wide
        ``lm_head``, 1.2 GB less at the peak).
        """
        after = self._bias_after_output(x, bias)
        if observing:
            self.observe("in", x)
            pre = fn(x, weight(), None if after else bias)
            self.observe("out", pre)
            return pre + bias if after else pre
        if not quant_op:
            return fn(self.act("in", x) if quant_in else x, weight(), bias)
        if self.kernel is not None:
            return self.act("out", self.linear(x, bias))
        xq, wq = self.act("in", x), self.weight(dtype)
        if after:
            return self.act("out", fn(xq, wq, None)) + bias
        if self.scheme.bias == "onnx_export" and bias is not None:
            bias = self._int32_bias(bias)
        return self.act("out", fn(xq, wq, bias))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A Linear through the low-precision kernel: codes in, one rescale of the sums out."""
        qp = self._qp("in", x)
        rows = x.reshape(-1, x.shape[-1])
        codes = quantize(rows, qp if qp.step.dim() == 0 else _rows(qp, rows))
        step_x = qp.step.reshape(-1, 1) if qp.step.dim() else qp.step
        step_w = self.w_qp.step.reshape(1, -1) if self.w_qp.step.dim() else self.w_qp.step
        if self.kernel == "int8_kernels":
            acc = torch._int_mm(codes, self.w_codes.t())
            out = acc.float() * (step_x * step_w)
        else:
            out = _scaled_mm(codes, self.w_codes, step_x, step_w)
        if bias is not None:
            out = out + bias.float()
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def _rows(qp: QParams, rows: torch.Tensor) -> QParams:
    """Per-token qparams reshaped to the flattened rows (one scale per row of the last dim)."""

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(rows.shape[0], 1)

    return QParams(qp.spec, flat(qp.mult), flat(qp.scale), flat(qp.zero_point))


def _scaled_mm(codes, w_codes, step_x, step_w) -> torch.Tensor:
    """e4m3 x e4m3 with float32 scales: per-tensor steps as _scaled_mm's own scales; per-token or
    per-channel steps multiply its float32 output."""
    scalar = step_x.dim() == 0 and step_w.dim() == 0
    one = torch.ones((), device=codes.device)
    out = torch._scaled_mm(
        codes,
        w_codes.t(),
        scale_a=step_x.float() if scalar else one,
        scale_b=step_w.float() if scalar else one,
        out_dtype=torch.float32,
    )
    return out if scalar else out * (step_x * step_w)
