from pathlib import Path

import pytest
import yaml

from op_sensitivity.errors import InputError
from op_sensitivity.params import load_params
from tests.conftest import REPO


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
