"""Scores, ranks, policies and exports on a hand-made report with known numbers."""

import copy
import json
import math
import re

import pytest
from PIL import Image

from op_sensitivity.errors import InputError
from op_sensitivity.exports import (
    inc_op_name_dict,
    llmcompressor_ignore,
    modelopt_quant_cfg,
    ort_nodes_to_exclude,
)
from op_sensitivity.fallback_list import build_fallback, write_fallback
from op_sensitivity.fallback_policy import choose, parse_fallback_params
from op_sensitivity.inventory import OpInfo
from op_sensitivity.rank_report import write_rank_report
from op_sensitivity.scores import agreement, phase_scores, select_phase
from op_sensitivity.sensitivity_report import read_report, validate

PATCH, UP, EMBED, DOWN, HEAD = (
    "model.visual.patch_embed.proj",
    "model.visual.blocks.0.mlp.up_proj",
    "model.language_model.embed_tokens",
    "model.language_model.layers.0.mlp.down_proj",
    "lm_head",
)
INVENTORY = [
    OpInfo(PATCH, "Conv3d", [4, 3, 2, 14, 14], 100, "vision", None),
    OpInfo(UP, "Linear", [10, 20], 200, "vision", None),
    OpInfo(EMBED, "Embedding", [30, 10], 300, "text", None),
    OpInfo(DOWN, "Linear", [40, 10], 400, "text", None),
    OpInfo(HEAD, "Linear", [30, 10], 300, "lm_head", EMBED),
]
INC_NAMES = {PATCH: PATCH, UP: UP, EMBED: EMBED + ".module", DOWN: DOWN, HEAD: "lm_head.module"}
# fallback raw values (LOW = sensitive) and the requant cumulative curve (E = 10).
FALLBACK = {PATCH: 8.0, UP: 10.0, EMBED: 8.0, DOWN: 5.0, HEAD: 6.0}
REQUANT = {PATCH: 1.0, UP: 1.0, EMBED: 3.0, DOWN: 6.0, HEAD: 10.0}


def _ops(values):
    return [
        {
            "op_name": INC_NAMES[op.name],
            "module": op.name,
            "op_type": op.type,
            "tower": op.tower,
            "position": i + 1,
            "mse": values[op.name],
            "mse_per_batch": [values[op.name]],
            "rank": 0,
        }
        for i, op in enumerate(INVENTORY)
    ]


def make_report():
    meta = {
        "versions": {"neural_compressor": "3.7.1", "torch": "2.13.0", "transformers": "5.23.0"},
        "model": {"origin": "hand-made", "params": 1300, "sha256": "0" * 64, "random_weights": True},
        "calibration": {
            "mode": "image_caption",
            "samples_used": 1,
            "manifest_records": 1,
            "batch_size": 1,
            "confidence_batches": 1,
        },
        "measured_at": "lm_head.module",
        "measure": "sum",
        "aggregation": "mean",
        "excluded_ops": [],
        "conv3d_handling": "quantized",
        "seconds": {"fallback": 1.0, "requant": 1.0},
    }
    return {
        "schema_version": 1,
        "engine": "inc",
        "metadata": meta,
        "phases": {
            "fallback": {"ops": _ops(FALLBACK)},
            "requant": {"ops": _ops(REQUANT), "cumulative": True},
        },
    }


@pytest.fixture
def report_file(tmp_path):
    path = tmp_path / "op_sensitivity.json"
    path.write_text(json.dumps(make_report()))
    return path


def _order(df):
    return list(df["module"])


def test_scores_have_one_direction_and_exact_values():
    s = phase_scores(make_report(), INVENTORY)
    fb, rq = s["fallback"], s["requant"]
    # fallback: (E - mse) / E; tie PATCH/EMBED at 0.2 broken by position.
    assert _order(fb) == [DOWN, HEAD, PATCH, EMBED, UP]
    assert dict(zip(fb["module"], fb["score"], strict=True)) == pytest.approx(
        {DOWN: 0.5, HEAD: 0.4, PATCH: 0.2, EMBED: 0.2, UP: 0.0}
    )
    assert list(fb["rank"]) == [1, 2, 3, 4, 5]
    assert list(fb["mse"]) == [5.0, 6.0, 8.0, 8.0, 10.0]  # raw values kept beside the score
    # requant: increments of the cumulative curve; they sum to the whole all-int8 error.
    assert _order(rq) == [HEAD, DOWN, EMBED, PATCH, UP]
    assert list(rq["score"]) == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    assert rq["score"].sum() == pytest.approx(1.0)
    assert dict(zip(fb["module"], fb["depth"], strict=True)) == {
        DOWN: 0,
        HEAD: 1,
        PATCH: -1,
        EMBED: -1,
        UP: 0,
    }


def test_phase_agreement_is_spearman_with_ties():
    rho, worst = agreement(phase_scores(make_report(), INVENTORY))
    assert rho == pytest.approx(8.5 / math.sqrt(95))  # average ranks for the fallback tie
    assert set(worst.loc[worst["rank_gap"] == 1, "op_name"]) == {
        "model.language_model.layers.0.mlp.down_proj",
        "lm_head.module",
        PATCH,
        "model.language_model.embed_tokens.module",
    }


def _params(**raw):
    base = {
        "phase": "fallback",
        "policy": "top_k",
        "top_k": {"k": 2},
        "top_fraction": {"fraction": 0.5},
        "threshold": {"value": 0.5, "relative": True},
        "error_budget": {"percent": 50},
    }
    base.update(raw)
    return parse_fallback_params(base)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"policy": "top_k"}, [DOWN, HEAD]),
        ({"policy": "top_fraction"}, [DOWN, HEAD, PATCH]),  # ceil(0.5 * 5) = 3
        ({"policy": "threshold"}, [DOWN, HEAD]),  # > 0.5 x max = 0.25
        ({"policy": "threshold", "threshold": {"value": 0.2}}, [DOWN, HEAD]),  # strictly above
        ({"policy": "threshold", "threshold": {"value": 0.15}}, [DOWN, HEAD, PATCH, EMBED]),
        ({"policy": "error_budget"}, [DOWN, HEAD]),  # 0.9 / 1.3 >= 50 %
        ({"policy": "error_budget", "error_budget": {"percent": 80}}, [DOWN, HEAD, PATCH]),
        ({"policy": "error_budget", "error_budget": {"percent": 100}}, [DOWN, HEAD, PATCH, EMBED]),
        ({"policy": "error_budget", "phase": "requant", "error_budget": {"percent": 70}}, [HEAD, DOWN]),
        ({"policy": "top_k", "phase": "both", "top_k": {"k": 3}}, [DOWN, HEAD, EMBED]),
        (
            {"policy": "top_k", "top_k": {"k": 1}, "always_keep": ["model.visual.patch_embed.*"]},
            [DOWN, PATCH],
        ),
        ({"policy": "top_k", "never_keep": ["lm_*"], "always_keep": ["lm_head"]}, [DOWN]),
    ],
)
def test_policies_choose_exact_sets(raw, expected):
    p = _params(**raw)
    chosen = choose(select_phase(phase_scores(make_report(), INVENTORY), p.phase), p)
    assert list(chosen["module"]) == expected
    assert all(chosen["reason"].str.len() > 0)


def test_combined_phase_ranks_by_mean_rank():
    both = select_phase(phase_scores(make_report(), INVENTORY), "both")
    assert _order(both) == [DOWN, HEAD, EMBED, PATCH, UP]
    assert list(both["mean_rank"]) == [1.5, 1.5, 3.5, 3.5, 5.0]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"policy": "random"},
            "fallback.policy: expected one of top_k, top_fraction, threshold, error_budget",
        ),
        (
            {"policy": "error_budget", "error_budget": {"percent": 0}},
            "error_budget.percent: expected a percentage",
        ),
        ({"policy": "error_budget", "error_budget": {"percent": 150}}, "in (0, 100]"),
        ({"policy": "top_fraction", "top_fraction": {"fraction": 1.5}}, "top_fraction.fraction"),
        ({"policy": "top_k", "top_k": {"k": 0}}, "top_k.k: expected an integer >= 1"),
        ({"phase": "all"}, "fallback.phase: expected one of fallback, requant, both"),
        ({"always_keep": "lm_head"}, "fallback.always_keep: expected a list"),
    ],
)
def test_bad_fallback_params(raw, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _params(**raw)


def test_k_larger_than_ops_is_an_error():
    p = _params(top_k={"k": 6})
    with pytest.raises(InputError, match=r"fallback.top_k.k: expected at most 5 \(ops scored\), got 6"):
        choose(phase_scores(make_report(), INVENTORY)["fallback"], p)


def test_nan_and_foreign_schema_are_rejected(tmp_path):
    bad = make_report()
    bad["phases"]["requant"]["ops"][2]["mse"] = float("nan")
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"phases.requant.ops\[2\].*finite"):
        read_report(path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema_version": 7, "ops": []}))
    with pytest.raises(InputError, match="schema_version 1"):
        read_report(other)
    missing = copy.deepcopy(make_report())
    del missing["phases"]["fallback"]["ops"][0]["tower"]
    with pytest.raises(InputError, match=r"phases.fallback.ops\[0\].tower: expected str"):
        validate(missing, "x.json")


def test_fallback_document_and_exports(tmp_path, report_file):
    p = _params(policy="top_k", top_k={"k": 2})
    doc = build_fallback(read_report(report_file), report_file, INVENTORY, p)
    assert [o["module"] for o in doc["ops"]] == [DOWN, HEAD]
    assert doc["ops"][0] == {
        "op_name": DOWN,
        "module": DOWN,
        "op_type": "Linear",
        "tower": "text",
        "score": 0.5,
        "rank": 1,
        "reason": "top_k: rank <= 2",
    }
    assert doc["source"]["path"] == str(report_file) and len(doc["source"]["sha256"]) == 64
    # 700 of 1300 weight params stay fp32: (32 * 700 + 8 * 600) / 1300
    assert doc["totals"] == {
        "ops_kept": 2,
        "ops_scored": 5,
        "params_kept": 700,
        "params_total": 1300,
        "share_params_kept": round(700 / 1300, 6),
        "effective_weight_bits": round((32 * 700 + 8 * 600) / 1300, 4),
    }
    out = tmp_path / "fallback"
    write_fallback(doc, INVENTORY, None, out, tmp_path / "fallback_metrics.json")
    assert json.loads((out / "inc_op_name_dict.json").read_text()) == {
        DOWN: {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}},
        "lm_head.module": {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}},
    }
    assert json.loads((out / "modelopt_quant_cfg.json").read_text()) == {
        "quant_cfg": {f"*{DOWN}.*": {"enable": False}, "*lm_head.*": {"enable": False}}
    }
    assert json.loads((out / "ort_nodes_to_exclude.json").read_text())["node_name_prefixes"] == [
        "/model/language_model/layers/0/mlp/down_proj/",
        "/lm_head/",
    ]
    assert json.loads((out / "llmcompressor_ignore.json").read_text()) == {"ignore": [DOWN, HEAD]}
    assert json.loads((tmp_path / "fallback_metrics.json").read_text())["ops_kept"] == 2


def test_inc_export_builds_a_config_inc_honours(small_model_dir, calibration_dir, tmp_path):
    from neural_compressor import PostTrainingQuantConfig

    from op_sensitivity.calibration import CalibrationLoader, build_batches
    from op_sensitivity.coco_captions import load_calibration
    from op_sensitivity.inc_engine import build_strategy, initial_tune_cfg, kept_fp32
    from op_sensitivity.model_source import load_model_dir

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
            "MatMul", ["x", "w1"], ["h"], name="/model/language_model/layers/0/mlp/down_proj/MatMul"
        ),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="/lm_head/MatMul"),
        helper.make_node("Relu", ["y"], ["z"], name="/model/language_model/layers/0/mlp/up_proj/Relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "w1", "w2")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 2])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), path)
    doc = ort_nodes_to_exclude([DOWN, HEAD, "model.visual.merger.mlp.0"], str(path))
    assert doc["nodes_to_exclude"] == [
        "/model/language_model/layers/0/mlp/down_proj/MatMul",
        "/lm_head/MatMul",
    ]
    assert doc["unresolved_modules"] == ["model.visual.merger.mlp.0"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        ort_nodes_to_exclude([DOWN], str(bad))


def test_llmcompressor_collapses_whole_groups_only():
    layer = [f"model.language_model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    inv = INVENTORY + [OpInfo(n, "Linear", [2, 2], 4, "text", None) for n in layer]
    assert llmcompressor_ignore(layer + [HEAD], inv) == [r"re:model\.language_model\.layers\.1\..*", HEAD]
    assert llmcompressor_ignore(layer[:2], inv) == layer[:2]
    assert llmcompressor_ignore([PATCH, UP], inv) == [r"re:model\.visual\..*"]  # whole vision tower
    assert modelopt_quant_cfg([HEAD]) == {"quant_cfg": {"*lm_head.*": {"enable": False}}}


def test_rank_report_writes_tables_plots_and_metrics(tmp_path):
    m = write_rank_report(make_report(), INVENTORY, tmp_path, top=None, plot_top=10)
    md = (tmp_path / "op_sensitivity.md").read_text()
    flat = re.sub(r" +", " ", md)
    assert "| rank | op_name | op_type | tower | mse_value | score |" in flat
    assert "Random weights" in md and "### Per tower" in md and "### Per op type" in md
    for name in ("spectrum", "depth", "cumulative_share", "requant_curve"):
        png = tmp_path / "plots" / f"{name}.png"
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(set(im.convert("L").getdata())) > 10  # something was drawn
    assert m["phase_spearman"] == pytest.approx(8.5 / math.sqrt(95), abs=1e-6)
    assert m["fallback"]["most_sensitive"] == {"vision": PATCH, "text": DOWN, "lm_head": HEAD}
    assert m["requant"]["top5pct_error_share"] == pytest.approx(0.4)  # top 1 of 5 ops
    assert m["all_int8_mse"] == 10.0
    top = (tmp_path / "rank" / "top_fallback.csv").read_text().splitlines()
    assert top[0] == "module,score" and top[1].startswith(DOWN)
