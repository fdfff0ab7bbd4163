"""ONNX Runtime's own ``quantize_static`` spectrum on the small model: the reference is sound.

The whole model (vision tower included) is exported; the values are ORT's, so the checks are on
their properties and on the quantized graphs ORT writes, not on our engine.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from op_sensitivity.engines.runner import load_inputs
from tests.helpers import sensitivity_params
from tests.schemes.ort_spectrum import OrtTrials, ort_spectrum
from tests.threads import torch_threads

MEASURED = "lm_head"
# Kept float in the graph checks: lm_head reads a tensor no quantized node reads; gate_proj shares
# its input with up_proj, which stays quantized.
KEPT = ("lm_head", "model.language_model.layers.0.mlp.gate_proj")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The module's values on one torch thread (as under xdist), the count given back after it."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def small(calibration_dir, small_model_dir):
    params = replace(sensitivity_params(), engine="native")
    model, spec, inventory, _ = load_inputs(
        params, calibration_dir, small_model_dir, small_model_dir.parent / "op_inventory.json"
    )
    scored = [op.name for op in inventory if op.type in ("Linear", "Conv3d")]
    return model, spec.batches[0], scored


@pytest.fixture(scope="module")
def spectrum(small, tmp_path_factory):
    model, batch, scored = small
    return ort_spectrum(model, batch, scored, MEASURED, tmp_path_factory.mktemp("ort_spectrum"))


@pytest.fixture(scope="module")
def trials(small, tmp_path_factory):
    model, batch, scored = small
    return OrtTrials(model, batch, scored, MEASURED, tmp_path_factory.mktemp("ort_trials"))


def test_spectrum_values_are_sound(spectrum, small):
    _, _, scored = small
    assert set(spectrum) == {"fallback", "requant", "all_int8"}
    assert list(spectrum["fallback"]) == scored and list(spectrum["requant"]) == scored
    values = [spectrum["all_int8"], *spectrum["fallback"].values(), *spectrum["requant"].values()]
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0.0 for v in values)
    assert spectrum["all_int8"] > 0.0
    # The last cumulative trial quantizes every scored module: the same graph as all_int8, quantized
    # and run again from scratch, gives the same logits to the bit.
    assert spectrum["requant"][scored[-1]] == spectrum["all_int8"]
    # One module quantized alone already perturbs the logits, and keeping lm_head float (its weight,
    # 375 x 32, and the logits' own int8 rounding) removes error.
    assert spectrum["requant"][scored[0]] > 0.0
    assert spectrum["fallback"]["lm_head"] < spectrum["all_int8"]


def test_export_is_the_model_and_names_carry_module_paths(trials, small):
    model, batch, scored = small
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits.numpy()
    assert trials.output == "logits"
    np.testing.assert_allclose(trials.reference, logits, atol=1e-5, rtol=0)
    # One compute node per module; ModuleList indices stay in their scope ("layers.0").
    assert all(len(nodes) == 1 for nodes in trials.nodes.values())
    assert trials.nodes["model.visual.patch_embed.proj"] == ["/model/visual/patch_embed/proj/Conv"]
    assert trials.nodes["model.visual.merger.mlp.0"] == ["/model/visual/merger/mlp/mlp.0/Gemm"]
    up = "model.language_model.layers.0.mlp.up_proj"
    assert trials.nodes[up] == ["/model/language_model/layers.0/mlp/up_proj/MatMul"]
    assert trials.nodes["lm_head"] == ["/lm_head/MatMul"]
    assert set(trials.nodes) == set(scored)


def test_excluded_nodes_stay_float(trials, small, tmp_path):
    _, _, scored = small
    quantized = [m for m in scored if m not in KEPT]
    graph = onnx.load(str(trials.quantize(quantized, tmp_path / "q.onnx"))).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in graph.node}

    def made_by(tensor: str) -> str | None:
        node = producer.get(tensor)
        return node.op_type if node is not None else None

    for module in KEPT:
        (node,) = (by_name[n] for n in trials.nodes[module])
        weight = node.input[1]
        assert weight in inits and inits[weight].data_type == onnx.TensorProto.FLOAT, module
        assert made_by(weight) is None
        assert all(r.op_type != "QuantizeLinear" for r in readers.get(node.output[0], [])), module
    # lm_head's input is read by lm_head alone: no Q/DQ pair on it. gate_proj's input is also
    # up_proj's: ORT puts one pair on the tensor and rewires every reader, gate_proj included.
    (lm_head,) = (by_name[n] for n in trials.nodes["lm_head"])
    assert made_by(lm_head.input[0]) != "DequantizeLinear"
    (gate,) = (by_name[n] for n in trials.nodes["model.language_model.layers.0.mlp.gate_proj"])
    assert made_by(gate.input[0]) == "DequantizeLinear"

    for module in quantized:
        (node,) = (by_name[n] for n in trials.nodes[module])
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear", module
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8  # weights int8, symmetric
        assert not np.any(onnx.numpy_helper.to_array(inits[dq.input[2]]))
        act = producer[node.input[0]]
        assert act.op_type == "DequantizeLinear", module
        assert inits[act.input[2]].data_type == onnx.TensorProto.INT8  # activations int8
        assert [r.op_type for r in readers[node.output[0]]] == ["QuantizeLinear"], module
