import json

import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.fallback.exports import (
    inc_op_name_dict,
    llmcompressor_ignore,
    modelopt_quant_cfg,
    ort_nodes_to_exclude,
)
from op_sensitivity.inventory import OpInfo
from tests.handmade import DOWN, HEAD, INVENTORY, PATCH, UP


def test_inc_export_builds_a_config_inc_honours(small_model_dir, calibration_dir, tmp_path):
    from neural_compressor import PostTrainingQuantConfig

    from op_sensitivity.data.calibration import load_calibration
    from op_sensitivity.engines.inc_loop import CalibrationLoader, build_strategy, initial_tune_cfg, kept_fp32
    from op_sensitivity.model.batches import build_batches
    from op_sensitivity.model.source import load_model_dir

    keep = ["lm_head.module", "model.language_model.layers.0.mlp.down_proj"]
    path = tmp_path / "inc_op_name_dict.json"
    path.write_text(json.dumps(inc_op_name_dict(keep)))
    loaded = json.loads(path.read_text())
    PostTrainingQuantConfig(op_name_dict=loaded)  # INC accepts the file as-is
    model, processor, _ = load_model_dir(small_model_dir)
    _, records = load_calibration(calibration_dir)
    loader = CalibrationLoader(build_batches(records[:1], calibration_dir, processor, "image_caption", 1), 1)
    strategy = build_strategy(model, loader, 1, 0.99, {}, loaded, tmp_path / "ws")
    fp32 = {name for name, _ in kept_fp32(initial_tune_cfg(strategy, 1))}
    assert fp32 == set(keep)


def test_ort_resolves_real_node_names_from_an_onnx_file(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node(
            "MatMul", ["x", "w1"], ["h"], name="/model/language_model/layers.0/mlp/down_proj/MatMul"
        ),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="/lm_head/MatMul"),
        helper.make_node("Relu", ["y"], ["z"], name="/model/language_model/layers.0/mlp/up_proj/Relu"),
        # a Sequential's child: the Sequential ran, so it is a scope of its own
        helper.make_node("Relu", ["z"], ["u"], name="/model/visual/merger/mlp/mlp.0/Gemm"),
        helper.make_node("Relu", ["u"], ["v"], name="/model/language_model/layers.0/mlp/down_proj_x/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "w1", "w2")],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 2])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    qkv = "model.visual.blocks.0.attn.qkv"
    doc = ort_nodes_to_exclude([DOWN, HEAD, "model.visual.merger.mlp.0"], path, model_ops=[DOWN, HEAD, qkv])
    assert doc["nodes_to_exclude"] == [
        "/model/language_model/layers.0/mlp/down_proj/MatMul",
        "/lm_head/MatMul",
        "/model/visual/merger/mlp/mlp.0/Gemm",
    ]
    assert doc["unresolved_modules"] == []
    assert ort_nodes_to_exclude([qkv], None)["node_name_prefixes"] == ["/model/visual/blocks.0/attn/qkv/"]
    # a kept module without a node: ONNX Runtime would quantize it, so the export is refused
    with pytest.raises(
        InputError, match=r"x.yaml: fallback.onnx_model: .*1 of the 2 kept modules have no node"
    ):
        ort_nodes_to_exclude([DOWN, qkv], path, "x.yaml: fallback.onnx_model")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        ort_nodes_to_exclude([DOWN], bad)


def _other_network(path):
    """A valid ONNX graph of another network (a small conv net exported by torch.onnx)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="/features/features.0/Conv"),
        helper.make_node("Relu", ["h"], ["r"], name="/features/features.1/Relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="/Flatten"),
        helper.make_node("MatMul", ["f", "w2"], ["y"], name="/classifier/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "other",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[
            helper.make_tensor("w", TensorProto.FLOAT, [2, 3, 1, 1], [0.5] * 6),
            helper.make_tensor("w2", TensorProto.FLOAT, [32, 2], [0.1] * 64),
        ],
    )
    onnx.save(helper.make_model(graph), path)


def test_ort_refuses_a_graph_of_another_network(tmp_path):
    """Nothing of the model in the graph: refused, even with an empty keep-list (nothing to exclude
    would read as 'quantize everything')."""
    path = tmp_path / "other.onnx"
    _other_network(path)
    ops = [op.name for op in INVENTORY]
    for keep in ([DOWN], []):
        with pytest.raises(
            InputError, match=r"fallback.onnx_model: .*other.onnx: not an export of this model"
        ):
            ort_nodes_to_exclude(keep, path, model_ops=ops)
    with pytest.raises(InputError, match=r"1 of the 1 kept modules have no node in the graph: '"):
        ort_nodes_to_exclude([DOWN], path)  # without the inventory: the keep-list alone


def test_llmcompressor_collapses_whole_groups_only():
    layer = [f"model.language_model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    inv = INVENTORY + [OpInfo(n, "Linear", [2, 2], 4, "text", None) for n in layer]
    assert llmcompressor_ignore(layer + [HEAD], inv) == [r"re:model\.language_model\.layers\.1\..*", HEAD]
    assert llmcompressor_ignore(layer[:2], inv) == layer[:2]
    assert llmcompressor_ignore([PATCH, UP], inv) == [r"re:model\.visual\..*"]  # whole vision tower
    modelopt = modelopt_quant_cfg([HEAD, DOWN])
    assert modelopt["quant_cfg"] == [
        {"quantizer_name": "lm_head.*", "enable": False},
        {"quantizer_name": f"{DOWN}.*", "enable": False},
    ]
    assert modelopt["stock_config_disables"]["kept_modules"] == [HEAD]  # stock INT8 has "*lm_head*"
