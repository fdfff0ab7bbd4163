"""Session fixtures: small real artifacts built with the library itself (no mocks), and each
expensive INC pass run once per test session, shared by the test modules that read it."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from op_sensitivity.data.calibration import prepare_calibration
from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.contract import PassResult
from op_sensitivity.engines.inc_loop import inc_util
from op_sensitivity.engines.runner import load_inputs, run_engine
from op_sensitivity.inventory import OpInfo, op_inventory, write_inventory
from op_sensitivity.model.fused import fused_groups, probe_batch
from op_sensitivity.model.source import CARD, dir_sha256, load_model_dir, materialize_model
from op_sensitivity.params import load_params
from tests.helpers import (
    EXCLUDE,
    REPO,
    SAMPLE_ANNOTATIONS,
    SAMPLE_IMAGES,
    SMALL_TINY,
    IncOracle,
    engine_reports,
    sensitivity_params,
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: one thread each (and in the stage subprocesses they start),
    # or OpenMP spin-waits double the CPU time. Comparisons stay within one worker's settings.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def torch_threads_restored(request):
    """Fails a test module that leaves torch's thread count changed (set up before the module's
    other fixtures, checked after their teardown): a count set and never given back changes the
    float sums of every later test, so results would hang on test order. Set it with
    ``tests.threads.torch_threads``."""
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    torch.set_num_threads(before)
    if after != before:
        pytest.fail(
            f"{request.module.__name__} left torch.set_num_threads at {after} (it was {before}): "
            "use tests.threads.torch_threads, which gives the count back",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def repo_params():
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory, repo_params) -> Path:
    """4 calibration pairs; the selection and test splits (6 pairs each, other images) beside it,
    ``selection_dir`` and ``test_dir``."""
    out = tmp_path_factory.mktemp("cal") / "calibration"
    captions = replace(
        repo_params.captions, annotations=SAMPLE_ANNOTATIONS, images_dir=SAMPLE_IMAGES, count=4
    )
    prepare_calibration(captions, out, out.parent / "selection", out.parent / "test")
    return out


@pytest.fixture(scope="session")
def selection_dir(calibration_dir) -> Path:
    return calibration_dir.parent / "selection"


@pytest.fixture(scope="session")
def test_dir(calibration_dir) -> Path:
    return calibration_dir.parent / "test"


@pytest.fixture(scope="session")
def small_model_params(repo_params, calibration_dir):
    tiny = replace(repo_params.model.tiny, text=SMALL_TINY["text"], vision=SMALL_TINY["vision"])
    return replace(repo_params.model, tiny=tiny, input=calibration_dir)


def _materialized(out: Path, params) -> Path:
    model, processor, card = materialize_model(params, out)
    groups = fused_groups(model, probe_batch(processor))
    write_inventory(op_inventory(model, groups), card.model_type, out.parent / "op_inventory.json")
    return out


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, calibration_dir, small_model_params) -> Path:
    """1 vision block, 1 decoder layer: 17 ops."""
    return _materialized(tmp_path_factory.mktemp("model") / "qwen2_5_vl", small_model_params)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory, calibration_dir, repo_params) -> Path:
    """The embedded default's sizes (29 ops)."""
    params = replace(repo_params.model, input=calibration_dir)
    return _materialized(tmp_path_factory.mktemp("default") / "qwen2_5_vl", params)


# Mid-size (about 68 M parameters, stored bf16 like the published checkpoints): big enough that
# memory and trial time are the model's, not the interpreter's.
MID_TINY = {
    "text": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "vision": {"depth": 2, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4},
}


@pytest.fixture(scope="session")
def mid_model_dir(tmp_path_factory, calibration_dir, repo_params) -> Path:
    tiny = replace(repo_params.model.tiny, text=MID_TINY["text"], vision=MID_TINY["vision"])
    params = replace(repo_params.model, tiny=tiny, input=calibration_dir)
    out = _materialized(tmp_path_factory.mktemp("mid") / "qwen2_5_vl", params)
    model, _, card = load_model_dir(out)
    model.to(torch.bfloat16).save_pretrained(out)
    (out / CARD).write_text(json.dumps(asdict(replace(card, sha256=dir_sha256(out)))))
    return out


@dataclass
class IncRun:
    """One real INC pass with INC's own values read beside the capture."""

    model: Any
    result: PassResult
    report: dict
    oracle: IncOracle
    inventory: list[OpInfo]
    originals: tuple
    util: Any


@pytest.fixture(scope="session")
def inc_small_run(small_model_dir, calibration_dir, tmp_path_factory) -> IncRun:
    """INC on the small model: 2 confidence batches, the vision block's MLP kept fp32 by params."""
    params = sensitivity_params(confidence_batches=2, op_name_dict=EXCLUDE)
    model, spec, inventory, meta = load_inputs(
        params, calibration_dir, small_model_dir, small_model_dir.parent / "op_inventory.json"
    )
    util = inc_util()
    originals = (util.get_mse_order_per_fp32, util.get_mse_order_per_int8)
    oracle = IncOracle(util)
    sys.settrace(oracle)
    try:
        result = run_engine("inc", model, spec, tmp_path_factory.mktemp("ws"))
    finally:
        sys.settrace(None)
    return IncRun(model, result, build_report(result, inventory, meta), oracle, inventory, originals, util)


@pytest.fixture(scope="session")
def inc_default_run(default_model_dir, calibration_dir, tmp_path_factory) -> dict:
    """INC's report on the embedded default's sizes, one confidence batch."""
    return engine_reports(
        default_model_dir, calibration_dir, sensitivity_params(), ["inc"], tmp_path_factory.mktemp("runs")
    )["inc"]


# Tests that read one of these fixtures run on the same xdist worker, so the fixture is built once.
SHARED_FIXTURES = ("inc_small_run", "inc_default_run", "default_native", "repo", "lean_reference", "planted")


def pytest_itemcollected(item):
    """Mark as each item is collected: xdist's loadgroup reads the marks in its modifyitems hook."""
    shared = next((f for f in SHARED_FIXTURES if f in item.fixturenames), None)
    if shared is not None:
        item.add_marker(pytest.mark.xdist_group(shared))
