"""The ranking curve on a model with a planted, function-preserving outlier (real model code)."""

import json
import math
from dataclasses import replace

import pytest

from op_sensitivity.params import CurveParams
from op_sensitivity.phases import RANKINGS
from op_sensitivity.report.scores import phase_scores
from op_sensitivity.validation.curve import (
    bisect_crossing,
    curve_cost,
    curve_sizes,
    curve_table,
    measure_curve,
    random_lists,
    read_curve,
    write_curve,
)
from op_sensitivity.validation.inputs import open_measurer, scored_and_excluded
from op_sensitivity.validation.measure import SELECTION
from tests.validation.planted import PLANTED


def _point(curve, ranking, n):
    return next(p for p in curve["points"] if p["ranking"] == ranking and p["n"] == n)


def test_the_planted_pair_is_found_and_keeping_it_recovers_the_damage(planted):
    """Each planted op alone is enough to wreck the output, so restoring one alone (single-op
    fallback) buys nothing; the single-op damage on the calibration captions ranks both first."""
    curve = planted["curve"]
    shares = curve["single_op"]
    by_damage = sorted(shares, key=lambda m: -shares[m]["damage_share"]["kl"])
    assert set(by_damage[:2]) == PLANTED and all(shares[m]["damage_share"]["kl"] > 0.8 for m in PLANTED)
    assert all(shares[m]["damage_share"]["kl"] < 0.05 for m in by_damage[2:])
    assert curve["rankings"]["measured"][:2] == by_damage[:2]
    top2 = _point(curve, "measured", 2)
    assert set(top2["kept"]) == PLANTED
    assert top2["recovered"]["kl"] >= 0.9 and top2["recovered"]["logit_se"] >= 0.85, top2["recovered"]
    random2 = next(r for r in curve["random"] if r["n"] == 2)
    assert random2["lists"] == 5 and random2["recovered"]["kl"]["mean"] < 0.3, random2["recovered"]["kl"]


def test_curve_end_points_are_exact(planted):
    curve = planted["curve"]
    n_ops = len(curve["ops"])
    assert curve["reference"]["fp32"]["kl"] == 0.0 and curve["reference"]["fp32"]["logit_se"] == 0.0
    for ranking in RANKINGS:
        assert _point(curve, ranking, 0)["values"] == curve["reference"]["all_int8"]
        full = _point(curve, ranking, n_ops)
        assert full["values"] == curve["reference"]["fp32"]  # every op back in fp32: exactly fp32
        assert full["values"]["top1"] == 1.0 and full["values"]["nll"] == full["values"]["nll_fp32"]
        assert full["recovered"]["kl"] == 1.0 and _point(curve, ranking, 0)["recovered"]["kl"] == 0.0
        assert full["cost"]["effective_weight_bits"] == 32.0


def test_curve_files_round_trip(planted, tmp_path):
    curve = planted["curve"]
    write_curve(curve, tmp_path / "curve.json", tmp_path / "curve.csv")
    assert read_curve(tmp_path / "curve.json") == json.loads(json.dumps(curve))
    table = curve_table(curve)
    assert list(table["n"]) == list(range(len(curve["ops"]) + 1))
    assert table.loc[2, "fallback_kl_recovered"] == pytest.approx(
        _point(curve, "fallback", 2)["recovered"]["kl"]
    )
    header = (tmp_path / "curve.csv").read_text().splitlines()[0]
    assert header.startswith("n,fallback_kl_recovered,requant_kl_recovered,measured_kl_recovered,random_kl")


def test_sizes_and_random_lists_are_deterministic():
    assert curve_sizes(5, None) == [0, 1, 2, 3, 4, 5]
    grid = curve_sizes(417, 10)
    assert grid[0] == 0 and grid[1] == 1 and grid[-1] == 417 and len(grid) <= 10 and grid == sorted(grid)
    ops = [f"op{i}" for i in range(20)]
    a = random_lists(ops, 3, 4, seed=0)
    assert a == random_lists(ops, 3, 4, seed=0) and a != random_lists(ops, 3, 4, seed=1)
    assert all(len(set(lst)) == 3 and lst == sorted(lst, key=ops.index) for lst in a)


GRID_417 = [*range(9), 10, 13, 16, 20, 25, 32, 40, 51, 64, 81, 102, 128, 161, 203, 256, 323, 406, 417]


def test_sizes_are_every_n_up_to_32_ops_then_log_spaced():
    """Hand-computed: every n to 8, then round(8 * 2 ** (k / 3)) below N, then N."""
    assert curve_sizes(29) == list(range(30))
    assert curve_sizes(32) == list(range(33))
    assert curve_sizes(41) == [*range(9), 10, 13, 16, 20, 25, 32, 40, 41]
    assert curve_sizes(417) == GRID_417
    assert curve_sizes(417, None) == list(range(418))


def test_the_cost_in_configurations_is_bounded_as_documented():
    """docs/artifacts.md "The curve's cost": references + single-op pool + 3 rankings and R random
    lists at the inner sizes + at most 9 bisections (3 shares x 3 rankings) in the widest gap."""
    params = CurveParams()
    assert curve_cost(29, params) == {
        "sizes": 30,
        "references": 3,
        "single_op_max": 29,
        "ranking_points": 84,
        "random_lists": 140,
        "refinement_max": 0,
        "total_max": 256,
    }
    dense_41 = 3 + 41 + 3 * 40 + 5 * 40  # 364: what every n cost on the 41-op snapshot
    assert curve_cost(41, params)["total_max"] == 3 + 41 + 3 * 15 + 5 * 15 + 9 * 3 == 191 < dense_41
    cost = curve_cost(417, params)  # the 3B: widest gap 406 - 323 = 83, ceil(log2 83) = 7 steps
    assert cost == {
        "sizes": 27,
        "references": 3,
        "single_op_max": 64,
        "ranking_points": 75,
        "random_lists": 125,
        "refinement_max": 63,
        "total_max": 330,
    }
    assert curve_cost(417, CurveParams(max_points=None, single_op="all"))["total_max"] == 3 + 417 + 8 * 416


def test_bisection_finds_the_crossing_inside_a_grid_gap():
    recovered = [0.0, 0.3, 0.45, 0.5, 0.62, 0.7, 0.8, 0.85, 0.91, 0.95, 1.0]  # n = 0..10
    seen = []

    def point(ranking, n):
        seen.append(n)
        return {"recovered": {"kl": recovered[n]}}

    assert bisect_crossing(point, "fallback", "kl", 0.9, [0, 1, 2, 10]) == 8
    assert bisect_crossing(point, "fallback", "kl", 0.5, [0, 1, 2, 10]) == 3
    assert bisect_crossing(point, "fallback", "kl", 0.3, [0, 1, 2, 10]) == 1  # on the grid: no search
    assert bisect_crossing(point, "fallback", "kl", 1.01, [0, 1, 2, 10]) is None
    assert max(seen) == 10 and len(set(seen)) < len(recovered)  # measured a few sizes, not all


def test_a_tolerance_stops_the_bisection_at_a_bracket_and_costs_what_the_plan_counts():
    """``curve.crossing_tolerance``: the bisection stops once the crossing is bracketed within the
    tolerance of the bracket's upper end and returns that end: a size that reaches the share, at
    most ``bisection_stop(n) - 1`` above the smallest (so within the tolerance of it, relative); it
    measures at most ``refinement_steps(sizes, tolerance)`` sizes inside a gap, the count the
    curve's cost bounds. Checked on a curve rising at every n of a grid with a 2..300 gap and a
    300..417 gap, at every share and tolerances from 0 to 0.3."""
    from op_sensitivity.validation.curve import bisection_stop, refinement_steps

    sizes = [0, 1, 2, 300, 417]
    for tolerance in (0.0, 0.01, 0.05, 0.1, 0.3):
        for target in [*range(3, 301, 7), *range(301, 418, 5)]:
            seen = []

            def point(ranking, n, target=target, seen=seen):
                seen.append(n)
                return {"recovered": {"kl": 1.0 if n >= target else 0.0}}

            got = bisect_crossing(point, "fallback", "kl", 0.5, sizes, tolerance)
            assert target <= got <= target + bisection_stop(got, tolerance) - 1, (tolerance, target, got)
            assert got - target <= max(0, tolerance * got)
            inside = {n for n in seen if n not in sizes}
            assert len(inside) <= refinement_steps(sizes, tolerance), (tolerance, target, len(inside))
        assert refinement_steps(sizes, tolerance) <= refinement_steps(sizes)
    assert refinement_steps(sizes) == 9 and refinement_steps(sizes, 0.05) == 9  # gap 2..300: stop 1 at 3
    ten = curve_sizes(417, 10)  # the 3B CPU profile's grid: widest gap 196..417, 8 steps; within 5 %: 5
    assert ten[-2:] == [196, 417] and refinement_steps(ten, 0.05) == 5 < refinement_steps(ten) == 8
    assert bisection_stop(417, 0.0) == 1 and bisection_stop(417, 0.05) == 21 and bisection_stop(6, 0.05) == 1
    exact, loose = CurveParams(), CurveParams(crossing_tolerance=0.05)
    # the 3B grid: 7 bisection steps a crossing (its widest gap, 323..406), 3 within 5 %
    assert curve_cost(417, loose)["refinement_max"] == 9 * 3 < curve_cost(417, exact)["refinement_max"] == 63
    assert curve_cost(29, loose) == curve_cost(29, exact)  # every n: nothing to bisect


def test_a_sparse_grid_gives_the_dense_curves_values_and_crossings(planted, calibration_dir, selection_dir):
    """The same measurer on a 4-size grid with a 2-op single-op pool: every value it measured equals
    the every-n curve's, each bisected crossing is one of that curve's crossings (reaches the share,
    n - 1 does not), and the measured ranking is the pool by damage, then the rest in fallback order."""
    dense, report, inventory = planted["curve"], planted["report"], planted["inventory"]
    rankings = {p: list(df["module"]) for p, df in phase_scores(report, inventory).items()}
    _, excluded = scored_and_excluded(report)
    params = CurveParams(max_points=4, single_op=2, random_lists=1)
    with open_measurer(
        planted["params"], 8, calibration_dir, selection_dir, planted["dir"], report, SELECTION
    ) as measurer:
        sparse = measure_curve(measurer, rankings, excluded, inventory, params)
        loose = measure_curve(
            measurer, rankings, excluded, inventory, replace(params, crossing_tolerance=0.3)
        )
    n_ops = len(dense["ops"])
    assert sparse["sizes"] == [0, 1, 4, n_ops] and len(dense["sizes"]) == n_ops + 1
    pool = sorted({*rankings["fallback"][:2], *rankings["requant"][:2]}, key=dense["ops"].index)
    assert list(sparse["single_op"]) == pool and sparse["single_op_pool"]["ops"] == len(pool)
    for m in pool:
        assert sparse["single_op"][m] == dense["single_op"][m]
    share = {m: sparse["single_op"][m]["damage_share"]["kl"] for m in pool}
    first = sorted(pool, key=lambda m: (-share[m], dense["ops"].index(m)))
    assert sparse["rankings"]["measured"] == first + [m for m in rankings["fallback"] if m not in pool]
    dense_points = {(p["ranking"], p["n"]): p for p in dense["points"]}
    for p in sparse["points"]:
        if p["ranking"] != "measured":  # the measured ranking's order differs (its pool)
            assert p["values"] == dense_points[p["ranking"], p["n"]]["values"]
    assert len(sparse["targets"]) == 9
    for t in sparse["targets"]:
        if t["n"] is None or t["ranking"] == "measured":
            continue
        got = [dense_points[t["ranking"], n]["recovered"]["kl"] for n in (t["n"] - 1, t["n"])]
        assert got[1] >= t["share"] - 1e-12 and (t["n"] == 0 or got[0] < t["share"]), t
    # crossing_tolerance 0.3: each crossing bracketed within 30 % of its upper end, that end reported
    assert {t["within"] for t in sparse["targets"] if t["n"] is not None} == {1}
    for t in loose["targets"]:
        if t["n"] is None or t["ranking"] == "measured":
            continue
        assert t["within"] == max(1, math.ceil(0.3 * t["n"]))
        assert dense_points[t["ranking"], t["n"]]["recovered"]["kl"] >= t["share"] - 1e-12, t
        exact = next(
            e["n"] for e in sparse["targets"] if e["ranking"] == t["ranking"] and e["share"] == t["share"]
        )
        assert exact <= t["n"] <= exact + t["within"] - 1
    assert len(loose["points"]) < len(sparse["points"])
    table = curve_table(sparse)
    assert list(table["n"]) == sparse["sizes"] and not table.isna().any().any()
