"""A keep-list read past a screened pass's float32 top says so, in the ranking the policy read."""

import json

import pytest

from op_sensitivity.engines.artifact import read_report
from op_sensitivity.fallback.keep_list import build_fallback
from tests.handmade import DOWN, EMBED, HEAD, INVENTORY, PATCH, UP, fallback_params, make_curve, make_report

# the hand-made report's rankings: fallback DOWN HEAD PATCH EMBED UP, requant HEAD DOWN EMBED PATCH UP


def _reason(tmp_path, exact_top: int, curve: dict, **raw) -> str:
    report = make_report()
    report["metadata"]["screening"] = {"precision": "bfloat16", "exact_top": exact_top, "refined": {}}
    path, curve_path = tmp_path / "op_sensitivity.json", tmp_path / "curve.json"
    path.write_text(json.dumps(report))
    curve_path.write_text(json.dumps(curve))
    p = fallback_params(always_keep=[], fused_groups=False, **raw)
    return build_fallback(read_report(path), path, INVENTORY, p, curve, curve_path)["policy"]["reason"]


def _pool(curve: dict, pool: list[str]) -> dict:
    """The curve with a single-op pool: the measured ranking orders it, then follows fallback's order."""
    curve["single_op"] = {m: v for m, v in curve["single_op"].items() if m in pool}
    damage = {m: v["damage_share"]["kl"] for m, v in curve["single_op"].items()}
    first = sorted(pool, key=lambda m: -damage[m])
    curve["rankings"]["measured"] = first + [m for m in curve["rankings"]["fallback"] if m not in pool]
    for q in (q for q in curve["points"] if q["ranking"] == "measured"):
        q["kept"] = curve["rankings"]["measured"][: q["n"]]
    return curve


@pytest.mark.parametrize(("exact_top", "said"), [(2, True), (3, False)])
def test_measured_budget_is_read_in_the_ranking_it_walked(tmp_path, exact_top, said):
    """The walk of requant keeps its top 3 (HEAD DOWN EMBED: 0.92 >= 0.90); EMBED is 4th in fallback,
    the phase the params name, which this walk never read."""
    budget = {"metric": "kl", "percent": 10, "ranking": "requant"}
    reason = _reason(tmp_path, exact_top, make_curve(), policy="measured_budget", measured_budget=budget)
    assert reason.startswith("measured_budget: the top 3 ops of the requant ranking")
    assert ("reaches rank 3 of the requant ranking, past the top 2" in reason) is said
    assert "fallback ranking" not in reason


@pytest.mark.parametrize(("exact_top", "said"), [(2, True), (3, False)])
def test_a_walk_of_the_measured_ranking_past_its_pool_reads_fallbacks_order(tmp_path, exact_top, said):
    """Pool DOWN HEAD (float32, the curve's): the third op of the measured ranking, PATCH, is there
    by its fallback rank, 3."""
    budget = {"metric": "kl", "percent": 10, "ranking": "measured"}
    curve = _pool(make_curve(), [DOWN, HEAD])
    assert curve["rankings"]["measured"] == [DOWN, HEAD, PATCH, EMBED, UP]
    reason = _reason(tmp_path, exact_top, curve, policy="measured_budget", measured_budget=budget)
    assert ("reaches rank 3 of the fallback ranking (the measured ranking past its" in reason) is said


@pytest.mark.parametrize(
    ("pool", "exact_top", "said"),
    [([DOWN, HEAD, EMBED], 2, True), ([DOWN, HEAD, EMBED], 3, False), (None, 1, False)],
)
def test_bits_budget_is_read_only_where_its_pool_came_from_a_ranking(tmp_path, pool, exact_top, said):
    """bits_budget reads no order; a pool of the top 3 of fallback and requant (EMBED: 4th and 3rd)
    depends on rank 3; a pool of every op on none."""
    curve = make_curve() if pool is None else _pool(make_curve(), pool)
    reason = _reason(tmp_path, exact_top, curve, policy="bits_budget")
    assert reason.startswith("bits_budget:")
    assert (
        "reaches rank 3 of the fallback and requant rankings (their top: the single-op pool)" in reason
    ) is said
