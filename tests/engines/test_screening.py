"""Screening: the fast pass's selection, and float32 values where the ranking is decided."""

import json
import math
from dataclasses import replace

import pytest

from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.contract import FP32
from op_sensitivity.engines.native import run_pass
from op_sensitivity.engines.runner import load_inputs
from op_sensitivity.engines.screening import PhaseValues, interval, observed_ratio, score_bounds, to_refine
from op_sensitivity.fallback.policy import choose
from op_sensitivity.inventory import read_inventory
from op_sensitivity.phases import FALLBACK, REQUANT
from op_sensitivity.report.scores import phase_scores, select_phase
from tests.handmade import fallback_params
from tests.helpers import sensitivity_params
from tests.validation.planted import PLANTED, planted_copy


def test_interval_holds_every_value_the_rounding_error_allows():
    lo, hi = interval(16.0, 1.0)  # sqrt 4 +- 1
    assert (lo, hi) == (9.0, 25.0)
    assert interval(0.25, 1.0) == (0.0, 2.25)  # never below zero
    assert interval(5.0, 0.0) == (5.0, 5.0)


def test_bounds_average_the_batches_and_keep_float32_values_exact():
    values = PhaseValues(values=[[16.0, 4.0], [36.0, 4.0]], exact=[[False, True], [False, True]])
    lo, hi = values.bounds([1.0, 2.0])
    assert lo == [(9.0 + 16.0) / 2, 4.0] and hi == [(25.0 + 64.0) / 2, 4.0]


def test_score_bounds_follow_the_report_scores():
    lo, hi = [1.0, 3.0, 6.0], [2.0, 4.0, 8.0]
    assert score_bounds(FALLBACK, True, lo, hi) == [(-2.0, -1.0), (-4.0, -3.0), (-8.0, -6.0)]
    assert score_bounds(REQUANT, False, lo, hi) == [(1.0, 2.0), (3.0, 4.0), (6.0, 8.0)]
    # cumulative: the increment over the previous curve point, c_0 = 0
    assert score_bounds(REQUANT, True, lo, hi) == [(1.0, 2.0), (3.0 - 2.0, 4.0 - 1.0), (6.0 - 4.0, 8.0 - 3.0)]


def test_to_refine_takes_every_op_that_could_stand_in_the_top():
    # top 2 by lower bound: 10 and 8 -> cut 8; op 2 (upper 9) could be second, op 3 (upper 7) cannot
    bounds = [(10.0, 11.0), (8.0, 9.0), (5.0, 9.0), (1.0, 7.0)]
    assert to_refine(FALLBACK, True, bounds, 2) == {0, 1, 2}
    assert to_refine(REQUANT, False, bounds, 2) == {0, 1, 2}
    # cumulative requant: an op's score is a difference, so the curve point before it comes too
    assert to_refine(REQUANT, True, [(1.0, 1.0), (0.0, 0.1), (5.0, 6.0)], 1) == {1, 2}
    # points (no screening error): exactly the top, ties included
    assert to_refine(FALLBACK, True, [(3.0, 3.0), (2.0, 2.0), (2.0, 2.0), (1.0, 1.0)], 2) == {0, 1, 2}
    assert to_refine(FALLBACK, True, [(1.0, 2.0)], 5) == {0}  # exact_top above the op count


def test_observed_ratio_measures_the_bound_on_refined_trials():
    assert observed_ratio(16.0, 9.0, 2.0) == pytest.approx(0.5)  # |4 - 3| / 2
    assert observed_ratio(4.0, 4.0, 0.0) == 0.0
    assert observed_ratio(4.0, 9.0, 0.0) == math.inf  # no error measured, yet the values differ


@pytest.fixture(scope="module")
def planted_pair(small_model_dir, calibration_dir, tmp_path_factory):
    """The planted model (an outlier pair in layer 0's MLP), native, float32 and bf16-screened."""
    work = tmp_path_factory.mktemp("screened")
    model_dir = planted_copy(
        small_model_dir, small_model_dir.parent / "op_inventory.json", work / "m" / "qwen"
    )
    inventory_path = model_dir.parent / "op_inventory.json"
    inventory = read_inventory(inventory_path)
    base = replace(sensitivity_params(op_name_dict={"lm_head": FP32}, confidence_batches=2), engine="native")
    reports = {}
    runs = {"none": ("none", 3, 1.0), "bfloat16": ("bfloat16", 3, 1.0), "tight": ("bfloat16", 1, 0.05)}
    for name, (screening, top, margin) in runs.items():
        native = replace(
            base.native, screening=screening, exact_top=top, screening_margin=margin, arithmetic="fake_quant"
        )
        params = replace(base, native=native)
        model, spec, _, meta = load_inputs(params, calibration_dir, model_dir, inventory_path)
        reports[name] = build_report(run_pass(model, spec, workspace=work / name), inventory, meta)
    return reports, inventory


def test_screened_pass_is_float32_where_the_ranking_is_decided(planted_pair):
    reports, inventory = planted_pair
    exact, screened = reports["none"], reports["bfloat16"]
    meta = screened["metadata"]["screening"]
    assert meta["precision"] == "bfloat16" and meta["exact_top"] == 3
    assert "screening" not in exact["metadata"]
    assert meta["observed_ratio"] <= meta["margin_used"]
    assert all(x["fp32"] > 0 and x["int8"] > 0 for x in meta["noise"])  # bf16 rounds: a real error measured
    assert screened["metadata"]["all_int8_mse"] == exact["metadata"]["all_int8_mse"]  # measured in float32
    scores = {k: phase_scores(r, inventory) for k, r in reports.items()}
    for phase in (FALLBACK, REQUANT):
        refined = set(meta["refined"][phase])
        assert refined, phase
        ops_exact = {o["op_name"]: o for o in exact["phases"][phase]["ops"]}
        for op in screened["phases"][phase]["ops"]:
            assert op["precision"] == ("float32" if op["op_name"] in refined else "bfloat16")
            if op["op_name"] in refined:  # every refined value is the float32 pass's, to the bit
                assert op["mse_per_batch"] == ops_exact[op["op_name"]]["mse_per_batch"]
        # the top exact_top of the ranking the policies read is the float32 pass's, in its order
        top = [list(scores[k][phase]["module"][:3]) for k in ("none", "bfloat16")]
        assert top[0] == top[1], phase
    # the planted outlier: quantizing up_proj is where the cumulative curve jumps
    assert scores["bfloat16"][REQUANT]["module"][0] == next(m for m in sorted(PLANTED) if "up_proj" in m)


@pytest.mark.parametrize("phase", ["fallback", "requant", "both"])
def test_the_rank_policies_ship_the_float32_list(planted_pair, phase):
    """top_k and error_budget read the ranking only: within exact_top they must pick what float32 picks."""
    reports, inventory = planted_pair
    for raw in ({"policy": "top_k", "top_k": {"k": 3}}, {"policy": "error_budget"}):
        p = fallback_params(phase=phase, fused_groups=False, always_keep=[], **raw)
        lists = [
            list(choose(select_phase(phase_scores(reports[k], inventory), phase), p)["op_name"])
            for k in ("none", "bfloat16")
        ]
        assert lists[0] == lists[1] and lists[0], (phase, raw)


def test_a_tight_bound_leaves_ops_unrefined_and_their_values_inside_it(planted_pair):
    """exact_top 1 and margin 0.05: the planted jump stands alone at the top of requant, so most
    ops stay at their bf16 values - each inside its interval around the float32 value."""
    reports, inventory = planted_pair
    exact, screened = reports["none"], reports["tight"]
    meta = screened["metadata"]["screening"]
    assert meta["observed_ratio"] <= meta["margin_used"]
    unrefined = [o for o in screened["phases"][REQUANT]["ops"] if o["precision"] == "bfloat16"]
    assert len(unrefined) >= len(screened["phases"][REQUANT]["ops"]) // 2
    top = [phase_scores(r, inventory)[REQUANT]["module"][0] for r in (exact, screened)]
    assert top[0] == top[1]
    noise = [meta["margin_used"] * max(x.values()) for x in meta["noise"]]
    for phase in (FALLBACK, REQUANT):
        ops_exact = {o["op_name"]: o for o in exact["phases"][phase]["ops"]}
        for op in (o for o in screened["phases"][phase]["ops"] if o["precision"] == "bfloat16"):
            for b, v in enumerate(op["mse_per_batch"]):
                lo, hi = interval(v, noise[b])
                assert lo <= ops_exact[op["op_name"]]["mse_per_batch"][b] <= hi


def test_screened_pass_resumes_to_the_same_bytes(small_model_dir, calibration_dir, tmp_path):
    inventory_path = small_model_dir.parent / "op_inventory.json"
    inventory = read_inventory(inventory_path)
    native = replace(sensitivity_params().native, screening="bfloat16", exact_top=2)
    params = replace(sensitivity_params(native=native, confidence_batches=2), engine="native")
    docs, results = [], []
    for _ in range(2):
        model, spec, _, meta = load_inputs(params, calibration_dir, small_model_dir, inventory_path)
        spec = replace(spec, model_sha256=meta["model"]["sha256"])  # a named model: the trial log is kept
        results.append(run_pass(model, spec, workspace=tmp_path))
        docs.append(json.dumps(build_report(results[-1], inventory, meta), sort_keys=True))
    assert docs[0] == docs[1]
    assert results[0].runtime["trials_resumed"] == 0 and results[1].runtime["trials_resumed"] > 0
