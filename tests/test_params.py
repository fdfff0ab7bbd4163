import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from op_sensitivity.errors import InputError
from op_sensitivity.params import (
    INC_DTYPES,
    INC_OP_TYPES,
    NativeParams,
    ReportParams,
    json_schema,
    load_params,
)
from tests.handmade import fallback_params
from tests.helpers import REPO, profiled_params_files, run_script


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
        {"metric": "kl", "percent": 50, "ranking": "auto"},
        ["lm_head"],
        True,
    )
    assert (p.curve.metric, p.curve.random_lists, p.validate.inc_check) == ("kl", 5, True)
    assert (p.captions.count, p.captions.selection_count, p.captions.test_count) == (8, 6, 6)


def test_omitted_optional_fields_take_the_dataclass_defaults(tmp_path):
    def strip(d):
        d["report"] = {}
        d["sensitivity"].pop("engine")
        d["sensitivity"]["native"] = {}

    p = load_params(_write(tmp_path, strip))
    assert p.report == ReportParams() and p.sensitivity.native == NativeParams()
    assert p.sensitivity.engine == "inc"


@pytest.mark.parametrize("block", ["crosscheck", "curve", "quantize", "validate", "report"])
def test_every_block_dvc_yaml_names_is_required(tmp_path, block):
    """DVC refuses a missing params block only when it reaches the stage that names it, after the
    stages before it ran; check_params must refuse it first (sweep: an omitted ``report``)."""
    with pytest.raises(InputError) as e:
        load_params(_write(tmp_path, lambda d: d.pop(block)))
    assert str(e.value) == f"{tmp_path / 'params.yaml'}: {block}: expected a mapping (the block is missing)"


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
        # unknown keys: a misspelt key would otherwise leave its default in force
        (
            lambda d: d["captions"].update(cout=3),
            "captions.cout: unknown key (expected one of annotations, images_dir, count, selection_count, "
            "test_count",
        ),
        (
            lambda d: d.update(sensitvity={}),
            "sensitvity: unknown key (expected one of captions, model, sensitivity, schemes",
        ),
        (
            lambda d: d["sensitivity"]["native"].update(devcie="cuda"),
            "sensitivity.native.devcie: unknown key (expected one of device, dtype, arithmetic, reduce_range",
        ),
        (
            lambda d: d["model"]["processor"].update(max_pixel=5000),
            "model.processor.max_pixel: unknown key (expected one of min_pixels, max_pixels)",
        ),
        (
            lambda d: d["model"]["tiny"]["text"].update(hidden=64),
            "model.tiny.text.hidden: unknown key (expected one of hidden_size, intermediate_size",
        ),
        (
            lambda d: d["fallback"].update(top_k={"k": 5, "kk": 1}),
            "fallback.top_k.kk: unknown key (expected one of k)",
        ),
        (lambda d: d["model"].update(hf_dir="data/hf"), "model.hf_dir: replaced by model.input"),
        (
            lambda d: d["captions"].update(eval_count=6),
            "captions.eval_count: replaced by selection_count and test_count, two disjoint held-out splits",
        ),
        (
            lambda d: d["captions"].update(test_count=0),
            "captions.test_count: expected an integer >= 1, got 0",
        ),
        (
            lambda d: d["captions"].pop("selection_count"),
            "captions.selection_count: missing",
        ),
        # what INC's static PyTorch pass cannot do
        (
            lambda d: d["sensitivity"].update(op_type_dict={"Linear": {"weight": {"dtype": ["int4"]}}}),
            "sensitivity.op_type_dict.Linear.weight.dtype[0]: expected one of fp32, bf16, int8, uint8 "
            "(the dtypes INC's static PyTorch pass takes op-wise), got 'int4'",
        ),
        (
            lambda d: d["sensitivity"].update(op_name_dict={"lm_head": {"activation": {"dtype": ["fp8"]}}}),
            "sensitivity.op_name_dict.lm_head.activation.dtype[0]: expected one of fp32, bf16, int8, uint8",
        ),
        (
            lambda d: d["sensitivity"].update(op_type_dict={"Foo": {"weight": {"dtype": ["fp32"]}}}),
            "sensitivity.op_type_dict.Foo: expected an op type INC's PyTorch adaptor quantizes (one of "
            "Conv1d, Conv2d, Conv3d, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d, Dropout, Embedding, "
            "EmbeddingBag, InstanceNorm3d, LayerNorm, Linear, QuantStub), got 'Foo'",
        ),
        (
            lambda d: d["sensitivity"].update(op_name_dict={"lm_head": {"weight": {"scheme": ["sym"]}}}),
            "sensitivity.op_name_dict.lm_head.weight.scheme: unknown key (expected dtype",
        ),
        # no scheme stage: `dvc repro` would fail later, on reports/schemes/ that no stage writes
        (
            lambda d: d["schemes"].update(run=[]),
            "schemes.run: expected at least one scheme, got []: fallback_list and rank_report read "
            "reports/schemes/",
        ),
        (lambda d: d.pop("schemes"), "schemes: expected a mapping (the block is missing)"),
        # every policy's settings block is checked, not only the chosen one's
        (lambda d: d["fallback"].update(top_k={"k": 0}), "fallback.top_k.k: expected an integer >= 1, got 0"),
        (
            lambda d: d["fallback"].update(policy="top_k", top_k=None),
            "fallback.top_k: missing (expected a mapping: the settings of policy top_k)",
        ),
        (lambda d: d.update(report=None), "report: expected a mapping, got null"),
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


def test_the_first_problem_is_one_line_naming_the_file():
    with pytest.raises(InputError) as err:
        fallback_params(policy="top_k", top_k={"k": "2"}, phase="all")
    assert str(err.value) == "params.yaml: fallback.phase: expected one of fallback, requant, both, got 'all'"


def test_inc_vocabulary_is_the_installed_inc_one():
    """INC_OP_TYPES / INC_DTYPES are the int8 'static' capabilities of INC's PyTorch adaptor (and
    its bf16 precision), read from the installed package's own file (INC is not imported)."""
    spec = importlib.util.find_spec("neural_compressor")
    caps = yaml.safe_load((Path(spec.submodule_search_locations[0]) / "adaptor/pytorch_cpu.yaml").read_text())
    newest = next(c for c in caps if c["version"]["name"] == "1.11")
    static = {k: v for k, v in newest["int8"]["static"].items() if k != "default"}
    assert set(INC_OP_TYPES) == set(static)
    dtypes = {d for cap in static.values() for part in cap.values() for d in part.get("dtype", [])}
    assert set(INC_DTYPES) == dtypes | {"bf16", "fp32"}


def test_checked_in_schema_and_reference_table_are_current():
    checked_in = json.loads((REPO / "params.schema.json").read_text())
    assert checked_in == json_schema(), "stale: run python scripts/params_schema.py"
    code, err = run_script(REPO / "scripts/params_schema.py", ["--check"], REPO)
    assert code == 0, err  # docs/params.md's generated table too
    assert (
        (REPO / "params.yaml").read_text().startswith("# yaml-language-server: $schema=params.schema.json\n")
    )


def test_params_and_every_profile_pass_the_models(tmp_path):
    files = profiled_params_files(tmp_path)
    assert len(files) == 1 + len(list((REPO / "profiles").glob("*.yaml"))) > 1
    for _, path in files:
        load_params(path)


def test_params_and_every_profile_validate_against_the_schema(tmp_path):
    import jsonschema  # a dev dependency: the editor's validator, run here

    files = profiled_params_files(tmp_path)
    validator = jsonschema.Draft202012Validator(json.loads((REPO / "params.schema.json").read_text()))
    for name, path in files:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert errors == [], name
    bad = yaml.safe_load((REPO / "params.yaml").read_text())
    bad["sensitivity"]["native"]["devcie"] = "cuda"
    assert not validator.is_valid(bad)  # the schema forbids unknown keys as the models do


def test_apply_profile_refuses_a_value_that_is_not_yaml_in_one_line(tmp_path):
    """Sweep of b375a75: ``-S 'x={bad'`` was a yaml.parser traceback."""
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_bytes()
    args = [str(REPO / "profiles/3b-cpu.yaml"), "--params", str(params), "-S", "x={bad"]
    code, err = run_script(REPO / "scripts/apply_profile.py", args, tmp_path)
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: -S 'x={bad': the value is not valid YAML (") and len(err.splitlines()) == 1
    assert params.read_bytes() == before
