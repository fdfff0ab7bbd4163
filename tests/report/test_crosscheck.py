"""The crosscheck stage when the main spectrum was measured in other numerics than INC's (another
scheme, or the native engine's isolated requant mode)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from op_sensitivity.engines.contract import VISION_FP32
from op_sensitivity.engines.runner import run_sensitivity
from op_sensitivity.params import CrosscheckParams, load_params
from op_sensitivity.report.comparison import summary_lines
from op_sensitivity.report.crosscheck import carved_pass, inc_numerics, run_crosscheck
from tests.helpers import profiled_params_files, sensitivity_params


def _stored_then_checked(native: dict, calibration_dir, model_dir, tmp_path) -> tuple[dict, Path, dict]:
    """The native pass under ``native`` settings, then the crosscheck of its report: (stored
    report, its path, crosscheck.json as written)."""
    params = sensitivity_params(engine="native", op_name_dict=VISION_FP32)
    params = replace(params, native=replace(params.native, **native))
    inventory, report, out = model_dir.parent / "op_inventory.json", tmp_path / "r.json", tmp_path / "c.json"
    ws = tmp_path / "ws"
    stored = run_sensitivity(
        params, calibration_dir, model_dir, inventory, report, tmp_path / "m.json", None, ws
    )
    before = report.read_bytes()
    doc = run_crosscheck(
        params, CrosscheckParams(), calibration_dir, model_dir, inventory, report, out, None, tmp_path / "cc"
    )
    assert json.loads(out.read_text()) == doc
    assert report.read_bytes() == before  # the main spectrum stays the stage's output
    # native inc_cpu reproduces INC (docs/engines.md): the same ranking in both phases
    assert doc["phases"]["fallback"]["spearman"] == 1.0
    assert doc["phases"]["requant"]["spearman"] == 1.0
    assert doc["checked_scheme"] == "inc_cpu" and doc["checked_requant_mode"] == "cumulative"
    return stored, report, doc


def test_a_modelopt_spectrum_is_crosschecked_as_native_inc_cpu_against_inc(
    calibration_dir, small_model_dir, tmp_path
):
    """INC computes only inc_cpu: both engines then run under it, and the document says so."""
    stored, _, doc = _stored_then_checked(
        {"scheme": "modelopt_int8"}, calibration_dir, small_model_dir, tmp_path
    )
    assert stored["metadata"]["scheme"]["name"] == "modelopt_int8"
    assert "modelopt_int8" in doc["native_rerun"]


def test_an_isolated_requant_spectrum_is_crosschecked_by_a_cumulative_native_rerun(
    calibration_dir, small_model_dir, tmp_path
):
    """params accept requant_mode isolated, so the crosscheck must get through it: INC's requant phase
    is cumulative, so the native engine reruns the pass cumulative and that run is compared."""
    native = {"requant_mode": "isolated"}
    stored, _, doc = _stored_then_checked(native, calibration_dir, small_model_dir, tmp_path)
    assert stored["phases"]["requant"]["cumulative"] is False
    assert "requant_mode isolated" in doc["native_rerun"]
    assert doc["candidate"]["engine"] == "native" and doc["reference"]["engine"] == "inc"
    assert doc["phases"]["requant"]["compared"] == "per-op increments of the cumulative curve"
    assert any("requant_mode isolated" in line for line in summary_lines(doc))


def test_the_native_side_runs_in_inc_numerics_whatever_the_main_pass_asked():
    """A kernel valid for the main pass's scheme (fp8_kernels under modelopt_fp8) is not one inc_cpu
    runs: the crosscheck takes inc_cpu's own arithmetic rather than refusing after the main pass."""
    p = sensitivity_params(engine="native")
    fp8 = replace(p, native=replace(p.native, scheme="modelopt_fp8", arithmetic="fp8_kernels"))
    fp8 = replace(fp8, native=replace(fp8.native, requant_mode="isolated"))
    for q in (inc_numerics(fp8), carved_pass(fp8)):
        assert (q.native.scheme, q.native.arithmetic, q.native.requant_mode) == (
            "inc_cpu",
            "auto",
            "cumulative",
        )
    kept = replace(p, native=replace(p.native, arithmetic="fake_quant", requant_mode="isolated"))
    assert inc_numerics(kept).native == replace(kept.native, requant_mode="cumulative")  # inc_cpu's own kept


def test_every_profiles_crosscheck_pass_builds(tmp_path):
    """A profile that screens with an exact_budget (3b-cpu) still gets its crosscheck: INC has no
    screening, so the comparison pass measures every op and drops the budget of a screened pass."""
    budgets = set()
    for name, path in profiled_params_files(tmp_path):
        sens = load_params(path).sensitivity
        budgets.add(sens.native.exact_budget)
        for q in (inc_numerics(sens), carved_pass(sens)):
            got = (q.native.screening, q.native.exact_budget, q.native.scheme)
            assert got == ("none", None, "inc_cpu"), name
    assert budgets - {None}  # some profile sets a budget: the case this test exists for
