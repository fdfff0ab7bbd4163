"""ONNX Runtime's own quantizer reads the nodes_to_exclude export and keeps exactly those nodes float."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from op_sensitivity.fallback.exports import ort_nodes_to_exclude, ort_prefix
from tests.handmade import DOWN, HEAD

ort_quant = pytest.importorskip("onnxruntime.quantization", reason="onnxruntime not installed (.[ort])")


def _graph(path):
    """Two MatMuls named as torch.onnx.export names modules DOWN and HEAD, weights as initializers."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}") for i in (1, 2)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name=ort_prefix(DOWN) + "MatMul"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        initializer=weights,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


class _Reader(ort_quant.CalibrationDataReader):
    def __init__(self):
        rng = np.random.default_rng(1)
        self.batches = iter([{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self.batches, None)


def test_quantize_static_keeps_exactly_the_exported_nodes_float(tmp_path):
    model_in, model_out = tmp_path / "m.onnx", tmp_path / "m_int8.onnx"
    _graph(model_in)
    export = ort_nodes_to_exclude([DOWN], model_in)
    assert export["nodes_to_exclude"] == ["/model/language_model/layers.0/mlp/down_proj/MatMul"]
    ort_quant.quantize_static(
        str(model_in), str(model_out), _Reader(), nodes_to_exclude=export["nodes_to_exclude"]
    )
    graph = onnx.load(str(model_out)).graph
    produced_by = {out: n for n in graph.node for out in n.output}
    matmuls = {n.name: n for n in graph.node if n.op_type == "MatMul"}
    kept, quantized = matmuls[export["nodes_to_exclude"][0]], matmuls["/lm_head/MatMul"]
    assert [produced_by.get(i) for i in kept.input][1] is None  # the float initializer w1 itself
    weight_src = produced_by[quantized.input[1]]
    assert weight_src.op_type == "DequantizeLinear"  # lm_head's weight went through int8
    assert {n.op_type for n in graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert ort_nodes_to_exclude([HEAD], model_in)["nodes_to_exclude"] == ["/lm_head/MatMul"]


def test_every_scored_op_of_a_real_torch_onnx_export_resolves(calibration_dir, small_model_dir, tmp_path):
    """The exporter's real names (``layers.0``, a Sequential's ``mlp/mlp.0``) map back to modules."""
    from dataclasses import replace

    from op_sensitivity.engines.runner import load_inputs
    from op_sensitivity.quantize.onnx_export import export_onnx
    from tests.helpers import sensitivity_params

    params = replace(sensitivity_params(), engine="native")
    model, spec, inventory, _ = load_inputs(
        params, calibration_dir, small_model_dir, small_model_dir.parent / "op_inventory.json"
    )
    path = tmp_path / "m.onnx"
    export_onnx(model, spec.batches[0], path)
    ops = [op.name for op in inventory if op.type in ("Linear", "Conv3d")]
    doc = ort_nodes_to_exclude(ops, path, model_ops=[op.name for op in inventory])
    assert doc["unresolved_modules"] == []
    # the Embedding too (an inc_cpu keep-list may hold it): kept modules without a node are refused
    embed = [op.name for op in inventory if op.type == "Embedding"]
    # its Gather is scoped under the outer model (which calls it), found by the weight it reads
    gathers = ort_nodes_to_exclude(embed, path)["nodes_to_exclude"]
    assert gathers and all(n.endswith("/Gather") for n in gathers)
    by_module = {
        m: [n for n in doc["nodes_to_exclude"] if n.startswith(doc["node_name_prefixes"][i])]
        for i, m in enumerate(ops)
    }
    merger = [n for n in doc["nodes_to_exclude"] if "/merger/mlp/mlp.0/" in n]
    assert merger and all(n.split("/")[-1].startswith(("Gemm", "MatMul", "Add")) for n in merger)
    # the ModuleList prefixes the export guesses without a graph hold for the decoder layers
    assert by_module["model.language_model.layers.0.mlp.down_proj"]
    # each node belongs to one module only
    assert len(doc["nodes_to_exclude"]) == len(set(doc["nodes_to_exclude"]))
