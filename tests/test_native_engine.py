"""The native engine against torch.ao references and against INC itself (real INC runs)."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from op_sensitivity.crosscheck import crosscheck
from op_sensitivity.errors import InputError
from op_sensitivity.full_size import full_size_config
from op_sensitivity.inventory import op_inventory, read_inventory
from op_sensitivity.model_source import load_model_dir, materialize_model
from op_sensitivity.native_engine import (
    FakeQuantModel,
    _act_observer,
    _fq_tensor,
    _qparams,
    fake_quant_weight,
    run_native_pass,
)
from op_sensitivity.params import SensitivityParams
from op_sensitivity.sensitivity import load_inputs, run_engine
from op_sensitivity.sensitivity_report import build_report
from op_sensitivity.tokenizer import train_tokenizer

FP32 = {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}
EXCLUDE = {r"model\.visual\.blocks\.0\.mlp\..*": FP32}
OUTLIER_OP = "model.language_model.layers.0.mlp.down_proj"


def _params(**kw) -> SensitivityParams:
    base = SensitivityParams(confidence_batches=1, batch_size=1, max_ops=64, tolerable_loss=0.99)
    return replace(base, **kw)


def _reports(
    model_dir: Path, calibration_dir: Path, params: SensitivityParams, engines, tmp: Path, mutate=None
):
    """Run each engine on identical inputs (a fresh model per engine) and build its report."""
    out = {}
    for spec in engines:
        engine, _, arithmetic = spec.partition("-")
        p = replace(params, native=replace(params.native, arithmetic=arithmetic or "auto"))
        model, loader, inventory, meta = load_inputs(
            p, calibration_dir, model_dir, model_dir.parent / "op_inventory.json"
        )
        if mutate:
            mutate(model)
        result = run_engine(engine, p, model, loader, inventory, "image_caption", tmp / spec)
        out[spec] = build_report(result, inventory, meta)
    return out


@pytest.fixture(scope="module")
def default_size_dir(tmp_path_factory, calibration_dir, repo_params):
    """The embedded default's sizes (29 ops)."""
    out = tmp_path_factory.mktemp("default") / "qwen2_5_vl"
    model, card = materialize_model(repo_params.model, calibration_dir, out)
    from op_sensitivity.inventory import write_inventory

    write_inventory(op_inventory(model), card.model_type, out.parent / "op_inventory.json")
    return out


@pytest.fixture(scope="module")
def default_runs(default_size_dir, calibration_dir, tmp_path_factory):
    return _reports(
        default_size_dir,
        calibration_dir,
        _params(),
        ["inc", "native", "native-fake_quant"],
        tmp_path_factory.mktemp("runs"),
    )


@pytest.fixture(scope="module")
def small_runs(small_model_dir, calibration_dir, tmp_path_factory):
    """A second config (1 layer, other widths), with ops excluded by params and 2 confidence batches."""
    return _reports(
        small_model_dir,
        calibration_dir,
        _params(confidence_batches=2, op_name_dict=EXCLUDE),
        ["inc", "native"],
        tmp_path_factory.mktemp("runs"),
    )


def test_weight_and_activation_fake_quant_match_torch_ao_reference():
    torch.manual_seed(0)
    w = torch.randn(16, 8) * 0.05
    obs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
    )
    obs(w)
    scale, zp = obs.calculate_qparams()
    ref = torch.quantize_per_channel(w, scale, zp, 0, torch.qint8).dequantize()
    torch.testing.assert_close(fake_quant_weight(w, "Linear"), ref, rtol=0, atol=1e-7)
    x = torch.randn(4, 8)
    act = _act_observer(False)
    act(x)
    qp = _qparams(act)
    ref_x = torch.quantize_per_tensor(x, float(qp[0]), int(qp[1]), torch.quint8).dequantize()
    torch.testing.assert_close(_fq_tensor(x, qp), ref_x, rtol=0, atol=1e-7)
    emb = torch.randn(30, 8) * 0.02
    eobs = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.quint8, qscheme=torch.per_channel_affine_float_qparams
    )
    eobs(emb)
    es, ez = eobs.calculate_qparams()
    eref = torch.quantize_per_channel(emb, es, ez, 0, torch.quint8).dequantize()
    torch.testing.assert_close(fake_quant_weight(emb, "Embedding"), eref, rtol=0, atol=1e-6)


class _Wrap(torch.nn.Module):
    """Keyword-argument forward, as the engine calls models (``model(**batch)``)."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("arithmetic", ["fake_quant", "int8_kernels"])
def test_single_linear_matches_torch_fx_quantization(arithmetic):
    """One Linear with INC's qconfig through torch.ao FX prepare/convert vs the engine's toggled module."""
    from torch.ao.quantization import QConfig, QConfigMapping, default_per_channel_weight_observer
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(1)
    model = _Wrap(torch.nn.Linear(32, 48)).eval()
    x = torch.randn(10, 32)
    qc = QConfig(
        activation=torch.ao.quantization.HistogramObserver.with_args(reduce_range=False),
        weight=default_per_channel_weight_observer,
    )
    prepared = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qc), (x,))
    prepared(x)
    expected = convert_fx(prepared)(x)
    fq = FakeQuantModel(model, ["lin"], reduce_range=False, arithmetic=arithmetic)
    fq.calibrate({"x": x})
    fq.set("lin", True)
    with torch.no_grad():
        got = model(x=x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    fq.set("lin", False)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x=x), torch.nn.functional.linear(x, model.lin.weight, model.lin.bias)
        )


def _check_exact(native, inc):
    result = crosscheck(native, inc)
    for phase, v in result["phases"].items():
        assert v["spearman"] == pytest.approx(1.0), phase
        assert v["top10_overlap"] == 1.0
        assert v["median_rel_diff"] <= 1e-6 and v["max_rel_diff"] <= 1e-4, (phase, v["largest_diffs"])
    assert result["passes_bar"]
    return result


def test_int8_kernels_reproduce_inc_on_the_default_tiny_model(default_runs):
    _check_exact(default_runs["native"], default_runs["inc"])
    meta = default_runs["native"]["metadata"]
    assert (
        meta["engine_details"]["arithmetic"] == "int8_kernels" and meta["engine_details"]["device"] == "cpu"
    )
    assert (
        meta["quantization"]["reduce_range"]
        == default_runs["inc"]["metadata"]["quantization"]["reduce_range"]
    )
    # The all-int8 error the native engine measures equals the end of INC's cumulative curve.
    inc_curve = sorted(default_runs["inc"]["phases"]["requant"]["ops"], key=lambda o: o["position"])
    assert meta["all_int8_mse"] == pytest.approx(inc_curve[-1]["mse"], rel=1e-6)


def test_int8_kernels_reproduce_inc_on_a_second_config_with_exclusions(small_runs):
    _check_exact(small_runs["native"], small_runs["inc"])
    excluded = {e["op_name"] for e in small_runs["native"]["metadata"]["excluded_ops"]}
    assert excluded == {f"model.visual.blocks.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def test_fake_quant_path_tracks_inc_within_requant_rounding(default_runs):
    """The GPU path (float fake-quant) on CPU: the only difference is fbgemm's requantization rounding."""
    result = crosscheck(default_runs["native-fake_quant"], default_runs["inc"])
    rq, fb = result["phases"]["requant"], result["phases"]["fallback"]
    assert rq["spearman"] >= 0.95 and rq["median_rel_diff"] <= 0.10
    # Fallback values of the random tiny model sit within ~1 % of each other (many exact ties in INC),
    # so rank order there is noise-level; the values themselves must agree within the bar.
    assert fb["median_rel_diff"] <= 0.10 and fb["max_rel_diff"] <= 0.10, fb


def test_isolated_mode_and_phase_relations(default_size_dir, calibration_dir, tmp_path, default_runs):
    iso = _reports(
        default_size_dir,
        calibration_dir,
        _params(native=replace(_params().native, requant_mode="isolated")),
        ["native"],
        tmp_path,
    )["native"]
    cum = default_runs["native"]
    assert (
        iso["phases"]["requant"]["cumulative"] is False
        and "ISOLATED" in iso["phases"]["requant"]["semantics"]
    )
    first = lambda rep: sorted(rep["phases"]["requant"]["ops"], key=lambda o: o["position"])[0]["mse"]  # noqa: E731
    assert first(iso) == first(cum)  # position 1: only that op is int8 in both modes
    assert iso["phases"]["fallback"] == cum["phases"]["fallback"]
    with pytest.raises(InputError, match="isolated"):
        crosscheck(iso, default_runs["inc"])


def test_planted_outlier_is_most_sensitive_under_both_engines(small_model_dir, calibration_dir, tmp_path):
    def plant(model):
        with torch.no_grad():
            dict(model.named_modules())[OUTLIER_OP].weight[0, :] *= 100.0

    runs = _reports(small_model_dir, calibration_dir, _params(), ["inc", "native"], tmp_path, mutate=plant)
    for engine, rep in runs.items():
        fb = min(rep["phases"]["fallback"]["ops"], key=lambda o: o["mse"])
        curve = sorted(rep["phases"]["requant"]["ops"], key=lambda o: o["position"])
        steps = {o["module"]: o["mse"] - (curve[i - 1]["mse"] if i else 0.0) for i, o in enumerate(curve)}
        assert fb["module"] == OUTLIER_OP, engine
        assert max(steps, key=steps.get) == OUTLIER_OP, engine


def test_device_and_bounds_errors(small_model_dir, calibration_dir):
    model, _, _ = load_model_dir(small_model_dir)
    inv = read_inventory(small_model_dir.parent / "op_inventory.json")
    kw = dict(
        module_order=[o.name for o in inv],
        op_types={o.name: o.type for o in inv},
        op_type_dict={},
        op_name_dict={},
    )
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="sensitivity.native.device: cuda requested"):
            run_native_pass(model, [{}], confidence_batches=1, max_ops=64, device="cuda", **kw)
    with pytest.raises(InputError, match="max_ops: the pass would score 17 ops"):
        run_native_pass(model, [{}], confidence_batches=1, max_ops=3, device="cpu", **kw)
    with pytest.raises(InputError, match="int8_kernels runs on cpu in float32 only"):
        run_native_pass(
            model,
            [{}],
            confidence_batches=1,
            max_ops=64,
            device="cpu",
            dtype="bfloat16",
            arithmetic="int8_kernels",
            **kw,
        )


def test_full_size_architecture_matches_the_published_counts():
    tok = train_tokenizer(["a red square"], 400)
    config = full_size_config(tok)
    with torch.device("meta"):
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration(config)
    ops = op_inventory(model)
    kinds = {}
    for op in ops:
        kinds[op.type] = kinds.get(op.type, 0) + 1
    assert kinds == {"Linear": 415, "Conv3d": 1, "Embedding": 1}
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
    assert config.text_config.hidden_size == 2048 and config.vision_config.depth == 32
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert json.loads(json.dumps(config.to_dict()))["text_config"]["vocab_size"] == 151936


def test_text_only_calibration_scores_text_ops_only(small_model_dir, calibration_dir, tmp_path):
    """Mode text_only: no image in the inputs; the vision tower is kept fp32 and both engines agree."""
    runs = {}
    for engine in ("inc", "native"):
        p = _params()
        model, _, inventory, meta = load_inputs(
            p, calibration_dir, small_model_dir, small_model_dir.parent / "op_inventory.json"
        )
        _, processor, _ = load_model_dir(small_model_dir)
        from op_sensitivity.calibration import CalibrationLoader, build_batches
        from op_sensitivity.coco_captions import load_calibration

        _, records = load_calibration(calibration_dir)
        loader = CalibrationLoader(build_batches(records[:1], calibration_dir, processor, "text_only", 1), 1)
        assert "pixel_values" not in loader.batches[0]
        runs[engine] = build_report(
            run_engine(engine, p, model, loader, inventory, "text_only", tmp_path / engine), inventory, meta
        )
    for rep in runs.values():
        scored = {o["module"] for o in rep["phases"]["fallback"]["ops"]}
        assert scored and not any(m.startswith("model.visual.") for m in scored)
        assert all("op_name_dict" in e["reason"] for e in rep["metadata"]["excluded_ops"])
        assert len(rep["metadata"]["excluded_ops"]) == 8  # Conv3d + 5 block Linear + 2 merger Linear
    _check_exact(runs["native"], runs["inc"])
