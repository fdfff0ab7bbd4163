from pathlib import Path

import pytest
import yaml

from op_sensitivity.errors import InputError
from op_sensitivity.params import NativeParams, ReportParams, load_params
from tests.handmade import fallback_params
from tests.helpers import REPO


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load_with_expected_defaults():
    p = load_params(REPO / "params.yaml")
    assert p.captions.mode == "image_caption"
    assert p.model.source == "tiny"
    assert p.sensitivity.confidence_batches == 2
    assert p.model.tiny.text["num_hidden_layers"] == 2
    assert (p.report.table_top, p.report.plot_top) == (None, 30)
    assert (p.fallback.policy, p.fallback.settings, p.fallback.always_keep, p.fallback.fused_groups) == (
        "measured_budget",
        {"metric": "kl", "percent": 50, "ranking": "fallback"},
        ["lm_head"],
        True,
    )
    assert (p.curve.metric, p.curve.random_lists, p.validate.inc_check, p.captions.eval_count) == (
        "kl",
        5,
        True,
        6,
    )


def test_omitted_optional_fields_take_the_dataclass_defaults(tmp_path):
    def strip(d):
        d.pop("report")
        d["sensitivity"].pop("engine")
        d["sensitivity"]["native"] = {}

    p = load_params(_write(tmp_path, strip))
    assert p.report == ReportParams() and p.sensitivity.native == NativeParams()
    assert p.sensitivity.engine == "inc"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["captions"].update(count=-1), "captions.count: expected an integer >= 1, got -1"),
        (lambda d: d["captions"].update(count="8"), "captions.count: expected an integer, got '8'"),
        (
            lambda d: d["captions"].update(mode="video"),
            "captions.mode: expected one of image_caption, text_only",
        ),
        (lambda d: d["model"].update(source="hub"), "model.source: expected one of tiny, hf_dir"),
        (lambda d: d["model"].update(full_size="32b"), "model.full_size: expected one of 3b, 7b"),
        (
            lambda d: d["sensitivity"].update(confidence_batches=True),
            "sensitivity.confidence_batches: expected",
        ),
        (
            lambda d: d["sensitivity"].update(tolerable_loss=2),
            "sensitivity.tolerable_loss: expected a relative loss",
        ),
        (
            lambda d: d["sensitivity"].update(op_type_dict={"Conv3d": "fp32"}),
            "sensitivity.op_type_dict.Conv3d",
        ),
        (
            lambda d: d["model"]["tiny"]["text"].update(num_attention_heads=3),
            "text.hidden_size: expected a multiple",
        ),
        (
            lambda d: d["model"]["processor"].update(max_pixels=1000),
            "model.processor.max_pixels: expected >=",
        ),
        (lambda d: d.pop("sensitivity"), "sensitivity: expected a mapping"),
        (lambda d: d["captions"].pop("seed"), "captions.seed: missing"),
        (lambda d: d["sensitivity"].update(engine="onnx"), "sensitivity.engine: expected one of inc, native"),
        (
            lambda d: d["sensitivity"]["native"].update(device="tpu"),
            "sensitivity.native.device: expected one of",
        ),
        (
            lambda d: d["sensitivity"]["native"].update(reduce_range="maybe"),
            "native.reduce_range: expected auto",
        ),
        (
            lambda d: d["sensitivity"]["native"].update(requant_mode="x"),
            "native.requant_mode: expected one of",
        ),
        (
            lambda d: d["sensitivity"]["native"].update(processes=0),
            "native.processes: expected an integer >= 1, got 0",
        ),
        (
            lambda d: d["sensitivity"]["native"].update(suffix_reuse="yes"),
            "native.suffix_reuse: expected true/false",
        ),
        (
            lambda d: d["sensitivity"]["native"].update(scheme="tensorrt"),
            "sensitivity.native.scheme: expected one of inc_cpu, modelopt_int8",
        ),
        (
            lambda d: d["schemes"].update(run=["modelopt_int8", "trt"]),
            "schemes.run[1]: expected one of inc_cpu, modelopt_int8, modelopt_fp8, llmcompressor_w8a8",
        ),
        (
            lambda d: d["schemes"].update(run=["ort_qdq", "ort_qdq"]),
            "schemes.run: lists a scheme twice",
        ),
        (
            lambda d: d["schemes"].update(run="ort_qdq"),
            "schemes.run: expected a list, got 'ort_qdq'",
        ),
        (
            lambda d: d["schemes"].update(arithmetic="int8_kernels"),
            "schemes.arithmetic: expected one of fake_quant, kernels",
        ),
        (
            lambda d: d["sensitivity"].update(op_name_dict={"model[": {"weight": {"dtype": ["fp32"]}}}),
            "sensitivity.op_name_dict.model[: expected a module name or a regular expression",
        ),
        (
            lambda d: d["sensitivity"].update(op_name_dict={"lm_head": {"weight": "fp32"}}),
            "sensitivity.op_name_dict.lm_head: expected a mapping with 'weight' and/or 'activation'",
        ),
        (lambda d: d.update(report="oops"), "report: expected a mapping, got str"),
        (
            lambda d: d["report"].update(table_top=0),
            "report.table_top: expected an integer >= 1 or null (all ops), got 0",
        ),
        (lambda d: d["report"].update(plot_top=True), "report.plot_top: expected an integer, got True"),
        (lambda d: d.pop("fallback"), "fallback: expected a mapping"),
        (
            lambda d: d["fallback"].update(onnx_model=3),
            "fallback.onnx_model: expected a string, got 3",
        ),
    ],
)
def test_bad_params_name_the_field(tmp_path, mutate, message):
    with pytest.raises(InputError) as err:
        load_params(_write(tmp_path, mutate))
    assert message in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_missing_and_malformed_params_file(tmp_path):
    with pytest.raises(InputError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("captions: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_params(bad)


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
        fallback_params(**raw)
