"""The crosscheck stage when the main spectrum was measured under another scheme than INC's."""

from __future__ import annotations

import json
from dataclasses import replace

from op_sensitivity.engines.contract import VISION_FP32
from op_sensitivity.engines.runner import run_sensitivity
from op_sensitivity.params import CrosscheckParams
from op_sensitivity.report.crosscheck import run_crosscheck
from tests.helpers import sensitivity_params


def test_a_modelopt_spectrum_is_crosschecked_as_native_inc_cpu_against_inc(
    calibration_dir, small_model_dir, tmp_path
):
    """INC computes only inc_cpu: both engines then run under it, and the document says so."""
    params = sensitivity_params(engine="native", op_name_dict=VISION_FP32)
    params = replace(params, native=replace(params.native, scheme="modelopt_int8"))
    inventory = small_model_dir.parent / "op_inventory.json"
    report = tmp_path / "op_sensitivity.json"
    stored = run_sensitivity(
        params,
        calibration_dir,
        small_model_dir,
        inventory,
        report,
        tmp_path / "m.json",
        None,
        tmp_path / "ws",
    )
    assert stored["metadata"]["scheme"]["name"] == "modelopt_int8"
    out = tmp_path / "crosscheck.json"
    doc = run_crosscheck(
        params,
        CrosscheckParams(),
        calibration_dir,
        small_model_dir,
        inventory,
        report,
        out,
        None,
        tmp_path / "cc",
    )
    assert doc["checked_scheme"] == "inc_cpu"
    assert json.loads(out.read_text())["checked_scheme"] == "inc_cpu"
    # native inc_cpu reproduces INC (docs/engines.md): the same ranking in both phases
    assert doc["phases"]["fallback"]["spearman"] == 1.0
    assert doc["phases"]["requant"]["spearman"] == 1.0
