"""``ort_qdq``: ONNX Runtime ``quantize_static`` with its defaults, read from its signature.

QDQ format, int8 activations (asymmetric per tensor, MinMax calibration; ``ActivationSymmetric``
defaults to False), int8 weights symmetric per tensor (``per_channel`` False, ``WeightSymmetric``
True, range [-127, 127]), scales computed in float64. A QuantizeLinear / DequantizeLinear pair sits
on each quantized MatMul / Gemm / Conv's input tensor (shared by the tensor's readers) and on its
output; how ``torch.onnx.export`` writes a Linear decides where the bias goes (``Scheme.bias``).
"""

from __future__ import annotations

import inspect

from ..errors import InputError
from .spec import QuantSpec, Scheme

EXTRA = "pip install -e '.[ort]'"
DTYPES = {"QInt8": "int8", "QUInt8": "uint8"}


def describe() -> Scheme:
    try:
        from onnxruntime.quantization import quantize_static
    except ImportError as exc:
        raise InputError(f"scheme ort_qdq: onnxruntime is not installed ({EXTRA})") from exc
    defaults = {k: p.default for k, p in inspect.signature(quantize_static).parameters.items()}
    act, wt = defaults["activation_type"].name, defaults["weight_type"].name
    if act not in DTYPES or wt not in DTYPES or defaults["calibrate_method"].name != "MinMax":
        method = defaults["calibrate_method"]
        raise InputError(f"onnxruntime quantize_static defaults changed: {act}, {wt}, {method}")
    activations = QuantSpec(DTYPES[act], "tensor", symmetric=False, scale_precision="float64")
    return Scheme(
        name="ort_qdq",
        library="onnxruntime",
        weights=QuantSpec(
            DTYPES[wt],
            "channel" if defaults["per_channel"] else "tensor",
            symmetric=True,
            narrow_range=DTYPES[wt] == "int8",
            scale_precision="float64",
        ),
        inputs=activations,
        outputs=activations,
        op_types=("Linear", "Conv3d"),
        source=f"onnxruntime.quantization.quantize_static defaults ({defaults['quant_format'].name})",
        notes=(
            "extra_options ActivationSymmetric=False, WeightSymmetric=True (documented defaults)",
            "graph placement as quantize_static writes it on a torch.onnx export: one Q/DQ pair per "
            "tensor shared by its readers; Linear as Gemm (2-D input, int32 bias) or MatMul + float Add",
        ),
        shared_input=True,
        bias="onnx_export",
    )
