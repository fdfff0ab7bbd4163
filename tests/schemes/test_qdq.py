"""Each scheme's quantize-dequantize of a known tensor against the tool's own quantizer, to the bit.

The tools are the optional extras `make test` installs: a missing one fails here, it is not skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from op_sensitivity.errors import InputError
from op_sensitivity.schemes import describe
from op_sensitivity.schemes.qdq import fake_quant, observe
from op_sensitivity.schemes.spec import QuantSpec


def known(shape=(2, 7, 64), seed=0) -> torch.Tensor:
    """Activations with an outlier channel and exact zeros: the cases where conventions differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0
    x[..., 3] *= 25.0
    x[..., 5] = 0.0
    return x


def ours(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    lo, hi = observe(x, spec)
    return fake_quant(x, spec, lo, hi)


def _modelopt_quantizer(num_bits, axis, x):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    tq = TensorQuantizer(QuantizerAttributeConfig(num_bits=num_bits, axis=axis))
    tq.disable_quant()
    tq.enable_calib()
    tq(x)
    tq.load_calib_amax()
    tq.disable_calib()
    tq.enable_quant()
    return tq(x)


@pytest.mark.parametrize("scheme", ["modelopt_int8", "modelopt_fp8"])
def test_modelopt_tensor_quantizer_matches_to_the_bit(scheme):
    s = describe(scheme)
    bits = 8 if s.inputs.dtype == "int8" else (4, 3)
    x = known()
    lib = _modelopt_quantizer(bits, None, x)
    assert torch.equal(ours(x, s.inputs), lib)
    assert not torch.equal(lib, x)  # it did quantize
    w = known((48, 64), seed=1)
    axis = 0 if s.weights.granularity == "channel" else None
    assert torch.equal(ours(w, s.weights), _modelopt_quantizer(bits, axis, w))


def test_compressed_tensors_w8a8_matches_to_the_bit():
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp

    s = describe("llmcompressor_w8a8")
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    x = known()
    args = preset.input_activations
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Linear(1, 1))
    lib = fake_quantize(x, scale, zp, preset.input_activations)
    assert torch.equal(ours(x, s.inputs), lib)
    w = known((48, 64), seed=1)
    scale, zp = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), preset.weights)
    lib_w = fake_quantize(w, scale, zp, preset.weights)
    assert torch.equal(ours(w, s.weights), lib_w)
    assert not torch.equal(lib_w, w)


def _ort_qdq(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """One QuantizeLinear -> DequantizeLinear graph with ONNX Runtime's own qparams, run by ORT."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qtype = TensorProto.INT8 if spec.dtype == "int8" else TensorProto.UINT8
    qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=spec.symmetric)
    zp, scale = compute_scale_zp(np.array(x.min()), np.array(x.max()), qmin, qmax, symmetric=spec.symmetric)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(np.array(scale, np.float32), "scale"), numpy_helper.from_array(zp, "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("position", ["inputs", "weights"])
def test_onnxruntime_qdq_matches_to_the_bit(position):
    spec = getattr(describe("ort_qdq"), position)
    x = known((48, 64), seed=2) + (3.0 if position == "inputs" else 0.0)  # asymmetric range
    lib = _ort_qdq(x.numpy(), spec)
    mine = ours(x, spec).numpy()
    assert np.array_equal(mine, lib)
    assert not np.array_equal(lib, x.numpy())


def test_the_schemes_read_from_the_tools_differ_where_the_tools_do():
    """What the issue says each tool deploys, as read from the tools themselves."""
    names = ("modelopt_int8", "modelopt_fp8", "llmcompressor_w8a8", "ort_qdq")
    mo, fp8, ct, ort_ = (describe(n) for n in names)
    assert (mo.inputs.dtype, mo.inputs.symmetric, mo.inputs.dynamic) == ("int8", True, False)
    assert mo.outputs is None
    assert "*visual*" in mo.skip and "*lm_head*" in mo.skip
    assert (fp8.weights.dtype, fp8.weights.granularity) == ("fp8_e4m3", "tensor")
    assert (ct.inputs.granularity, ct.inputs.dynamic, ct.weights.granularity) == ("token", True, "channel")
    assert (ort_.inputs.symmetric, ort_.weights.granularity) == (False, "tensor")
    assert ort_.weights.narrow_range
    assert ort_.outputs is not None


def test_unknown_scheme_and_bad_specs_are_named():
    with pytest.raises(InputError, match="unknown scheme 'int4'.*inc_cpu"):
        describe("int4", "sensitivity.native.scheme")
    with pytest.raises(InputError, match="QuantSpec.granularity: 'block'"):
        QuantSpec("int8", "block", symmetric=True)
    with pytest.raises(InputError, match="fp8_e4m3 is symmetric"):
        QuantSpec("fp8_e4m3", "tensor", symmetric=False)
