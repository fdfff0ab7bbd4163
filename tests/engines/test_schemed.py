"""The pass under a deployment scheme: which ops it scores, clear errors, the planted outlier."""

from __future__ import annotations

from dataclasses import replace

import pytest

from op_sensitivity.engines.artifact import build_report, scheme_name
from op_sensitivity.engines.contract import FP32, build_spec
from op_sensitivity.engines.runner import load_inputs, run_engine, scheme_params
from op_sensitivity.errors import InputError
from op_sensitivity.inventory import read_inventory
from op_sensitivity.params import SchemesParams
from op_sensitivity.phases import REQUANT
from op_sensitivity.report.scores import phase_scores
from tests.helpers import sensitivity_params
from tests.validation.planted import MLP, planted_copy

SCHEMES = ("inc_cpu", "modelopt_int8", "modelopt_fp8", "llmcompressor_w8a8", "ort_qdq")


def _spec(small_model_dir, scheme, engine="native"):
    params = sensitivity_params(engine=engine)
    params = replace(params, native=replace(params.native, scheme=scheme))
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    return build_spec(params, inventory, [{}], "image_caption")


def test_each_scheme_scores_what_its_tool_quantizes(small_model_dir):
    reasons = {e.op_name: e.reason for e in _spec(small_model_dir, "modelopt_int8").excluded}
    assert "'*visual*'" in reasons["model.visual.blocks.0.attn.qkv"]
    assert "'*lm_head*'" in reasons["lm_head"]
    embed = "model.language_model.embed_tokens"
    assert reasons[embed] == "not quantized by scheme modelopt_int8 (it quantizes Linear, Conv3d)"
    ct = {e.op_name: e.reason for e in _spec(small_model_dir, "llmcompressor_w8a8").excluded}
    assert "not quantized by scheme llmcompressor_w8a8" in ct["model.visual.patch_embed.proj"]
    assert set(ct) == {"model.visual.patch_embed.proj", "lm_head", embed}
    assert _spec(small_model_dir, "inc_cpu").excluded == ()
    assert [e.op_name for e in _spec(small_model_dir, "ort_qdq").excluded] == [embed]


def test_engine_inc_measures_only_its_own_scheme(small_model_dir):
    with pytest.raises(
        InputError, match=r"sensitivity\.native\.scheme: modelopt_int8 is measured by engine native"
    ):
        _spec(small_model_dir, "modelopt_int8", engine="inc")


def test_kernels_need_a_scheme_they_can_compute(calibration_dir, small_model_dir):
    inventory = small_model_dir.parent / "op_inventory.json"
    for scheme, arithmetic in [
        ("ort_qdq", "int8_kernels"),
        ("modelopt_int8", "fp8_kernels"),
        ("inc_cpu", "fp8_kernels"),
    ]:
        params = sensitivity_params(engine="native")
        params = replace(params, native=replace(params.native, scheme=scheme, arithmetic=arithmetic))
        model, spec, _, _ = load_inputs(params, calibration_dir, small_model_dir, inventory)
        with pytest.raises(InputError, match=r"sensitivity\.native\.arithmetic"):
            run_engine("native", model, spec, small_model_dir.parent / "unused")


def test_scheme_stage_params_pick_the_schemes_kernel():
    base = sensitivity_params()
    kernels = SchemesParams(run=SCHEMES, arithmetic="kernels")
    picked = {s: scheme_params(base, s, kernels).native.arithmetic for s in SCHEMES}
    assert picked == {
        "inc_cpu": "auto",
        "modelopt_int8": "int8_kernels",
        "modelopt_fp8": "fp8_kernels",
        "llmcompressor_w8a8": "int8_kernels",
        "ort_qdq": "fake_quant",  # asymmetric activations: no zero-point-free int8 GEMM
    }
    assert scheme_params(base, "ort_qdq", SchemesParams(run=("ort_qdq",))).engine == "native"


@pytest.fixture(scope="module")
def planted_dir(small_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("planted_schemes") / "qwen2_5_vl"
    return planted_copy(small_model_dir, small_model_dir.parent / "op_inventory.json", out)


def _isolated(calibration_dir, model_dir, scheme, work):
    """Each op int8 alone (requant isolated), lm_head kept fp32: every op's own damage."""
    params = sensitivity_params(engine="native", op_name_dict={"lm_head": FP32})
    params = replace(params, native=replace(params.native, scheme=scheme, requant_mode="isolated"))
    inventory_path = model_dir.parent / "op_inventory.json"
    model, spec, inventory, meta = load_inputs(params, calibration_dir, model_dir, inventory_path)
    report = build_report(run_engine("native", model, spec, work / scheme), inventory, meta)
    assert scheme_name(report) == scheme and report["metadata"]["scheme"]["name"] == scheme
    return report, list(phase_scores(report, inventory)[REQUANT]["module"])


def test_planted_outlier_tops_every_int8_scheme_and_costs_fp8_nothing(
    calibration_dir, small_model_dir, planted_dir, tmp_path
):
    """One MLP channel x1000 in up_proj, its down_proj column / 1000: fp32 unchanged.

    down_proj's input then has one huge channel, so a single input scale (static per tensor, or
    per token: the channel is in every token) leaves the other channels a few levels: down_proj is
    the most damaging op under every int8 scheme. up_proj is next where its output is requantized
    (inc_cpu, ort_qdq) - per-channel weights alone (ModelOpt, compressed-tensors) absorb the scaled
    row. FP8 keeps 3 significant bits at every magnitude: the outlier costs it nothing.
    """
    damage, clean = {}, {}
    for scheme in SCHEMES:
        report, ranking = _isolated(calibration_dir, planted_dir, scheme, tmp_path / "planted")
        damage[scheme] = report["metadata"]["all_int8_mse"]
        clean[scheme] = _isolated(calibration_dir, small_model_dir, scheme, tmp_path / "clean")[0][
            "metadata"
        ]["all_int8_mse"]
        if scheme == "modelopt_fp8":
            assert abs(damage[scheme] - clean[scheme]) / clean[scheme] < 0.1
            continue
        assert ranking[0] == f"{MLP}.down_proj", (scheme, ranking[:3])
        if scheme in ("inc_cpu", "ort_qdq"):
            assert ranking[1] == f"{MLP}.up_proj", (scheme, ranking[:3])
        assert damage[scheme] > 10 * clean[scheme], scheme
    # all-int8 damage: static per-tensor > dynamic per-token > fp8
    assert damage["modelopt_fp8"] < damage["llmcompressor_w8a8"] < damage["modelopt_int8"]
    assert damage["llmcompressor_w8a8"] < min(damage["inc_cpu"], damage["ort_qdq"])
