"""The ranking curve on a model with a planted, function-preserving outlier (real model code)."""

import json

import pytest

from op_sensitivity.phases import RANKINGS
from op_sensitivity.validation.curve import (
    curve_sizes,
    curve_table,
    random_lists,
    read_curve,
    write_curve,
)
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
