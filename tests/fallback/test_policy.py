from dataclasses import replace

import pandas as pd
import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.fallback.policy import CANDIDATE_MAX, SCAN_MAX, auto_ranking, choose, curve_n, walk_cost
from op_sensitivity.report.scores import phase_scores, select_phase
from tests.handmade import (
    DOWN,
    EMBED,
    HEAD,
    INVENTORY,
    PATCH,
    RANKINGS,
    UP,
    fallback_params,
    make_curve,
    make_report,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"policy": "top_k"}, [DOWN, HEAD]),
        ({"policy": "top_fraction"}, [DOWN, HEAD, PATCH]),  # ceil(0.5 * 5) = 3
        ({"policy": "threshold"}, [DOWN, HEAD]),  # > 0.5 x max = 0.25
        ({"policy": "threshold", "threshold": {"value": 0.2}}, [DOWN, HEAD]),  # strictly above
        ({"policy": "threshold", "threshold": {"value": 0.15}}, [DOWN, HEAD, PATCH, EMBED]),
        ({"policy": "error_budget"}, [DOWN, HEAD]),  # 0.9 / 1.3 >= 50 %
        ({"policy": "error_budget", "error_budget": {"percent": 80}}, [DOWN, HEAD, PATCH]),
        ({"policy": "error_budget", "error_budget": {"percent": 100}}, [DOWN, HEAD, PATCH, EMBED]),
        ({"policy": "error_budget", "phase": "requant", "error_budget": {"percent": 70}}, [HEAD, DOWN]),
        ({"policy": "top_k", "phase": "both", "top_k": {"k": 3}}, [DOWN, HEAD, EMBED]),
        (
            {"policy": "top_k", "top_k": {"k": 1}, "always_keep": ["model.visual.patch_embed.*"]},
            [DOWN, PATCH],
        ),
        ({"policy": "top_k", "never_keep": ["lm_*"], "always_keep": ["lm_head"]}, [DOWN]),
    ],
)
def test_policies_choose_exact_sets(raw, expected):
    p = fallback_params(**raw)
    chosen = choose(select_phase(phase_scores(make_report(), INVENTORY), p.phase), p)
    assert list(chosen["module"]) == expected
    assert all(chosen["reason"].str.len() > 0)


def test_k_larger_than_ops_is_an_error():
    p = fallback_params(top_k={"k": 6})
    with pytest.raises(InputError, match=r"fallback.top_k.k: expected at most 5 \(ops scored\), got 6"):
        choose(phase_scores(make_report(), INVENTORY)["fallback"], p)


GROUP = "model.x.{down_proj,up_proj}"  # an artificial fused pair, to test widening on known numbers
GROUPED = [replace(op, fused_group=GROUP) if op.name in (UP, DOWN) else op for op in INVENTORY]


def _choose(inventory=INVENTORY, **raw):
    p = fallback_params(**{"always_keep": [], **raw})
    return list(
        choose(select_phase(phase_scores(make_report(), inventory), p.phase), p, make_curve(), inventory)[
            "module"
        ]
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # fewest top ops whose measured damage is at most percent % of all-int8's (recovered >= 1 - p)
        ({"policy": "measured_budget"}, [DOWN, HEAD, PATCH]),  # 0.92 >= 0.90 at n = 3
        (
            {
                "policy": "measured_budget",
                "measured_budget": {"metric": "kl", "percent": 50, "ranking": "fallback"},
            },
            [DOWN, HEAD],
        ),
        (
            {
                "policy": "measured_budget",
                "measured_budget": {"metric": "kl", "percent": 50, "ranking": "measured"},
            },
            [UP, DOWN],
        ),
        (
            {
                "policy": "measured_budget",
                "measured_budget": {"metric": "kl", "percent": 0, "ranking": "requant"},
            },
            [PATCH, UP, EMBED, DOWN, HEAD],
        ),
        # knapsack: 325 of 1300 params; PATCH (100, 0.3) + UP (200, 0.25) beat DOWN alone (400, too big)
        ({"policy": "bits_budget"}, [PATCH, UP]),
        (
            {"policy": "bits_budget", "bits_budget": {"metric": "kl", "bits": 14.0}},
            [PATCH, UP],
        ),  # the same budget
        # 715 params: DOWN + PATCH + UP (700, 1.05) beat DOWN + HEAD (700, 0.7)
        ({"policy": "bits_budget", "bits_budget": {"metric": "kl", "params_share": 0.55}}, [PATCH, UP, DOWN]),
    ],
)
def test_measured_policies_pick_the_hand_checked_sets(raw, expected):
    chosen = _choose(**raw)
    assert sorted(chosen) == sorted(expected) and len(chosen) == len(expected)


def test_bits_budget_without_room_is_an_error():
    with pytest.raises(InputError, match=r"fallback.bits_budget: 9 effective weight bits leave no room"):
        _choose(policy="bits_budget", bits_budget={"metric": "kl", "bits": 9.0})


def test_fused_groups_are_kept_whole():
    assert _choose(GROUPED, policy="top_k", top_k={"k": 1}) == [DOWN, UP]  # UP widened in
    p = fallback_params(policy="top_k", top_k={"k": 1}, always_keep=[])
    chosen = choose(select_phase(phase_scores(make_report(), GROUPED), "fallback"), p, None, GROUPED)
    assert chosen.set_index("module").loc[UP, "reason"] == f"fused group {GROUP} (with {DOWN})"
    # the knapsack weighs the pair as one item: PATCH alone fits 325 params, the 600-param pair does not
    assert _choose(GROUPED, policy="bits_budget") == [PATCH]
    assert _choose(GROUPED, policy="top_k", top_k={"k": 1}, fused_groups=False) == [DOWN]
    with pytest.raises(
        InputError, match=r"fallback.never_keep: drops \['model.visual.blocks.0.mlp.up_proj'\]"
    ):
        _choose(GROUPED, policy="top_k", top_k={"k": 1}, never_keep=[UP])


def test_measured_policies_need_the_curve():
    p = fallback_params(policy="measured_budget")
    with pytest.raises(InputError, match="measured_budget needs the ranking curve"):
        choose(select_phase(phase_scores(make_report(), INVENTORY), "fallback"), p, None, INVENTORY)


# --- measured_budget measures the list it ships (issue 19) -----------------------------------------


def _values(kl: float) -> dict[str, float]:
    return {"kl": kl, "top1": 1.0, "nll": 1.0, "nll_fp32": 1.0, "logit_se": kl}


def _walk(measure, **raw) -> list[str]:
    p = fallback_params(**raw)
    curve = {**make_curve(), "reference": {"all_int8": _values(1.0), "fp32": _values(0.0)}}
    df = select_phase(phase_scores(make_report(), INVENTORY), p.phase)
    chosen = choose(df, p, curve, INVENTORY, measure)
    return list(zip(chosen["module"], chosen["reason"], strict=True))


def test_an_always_kept_op_that_carries_all_the_damage_gets_nothing_added():
    """lm_head alone holds every bit of the damage and always_keep keeps it: the walk measures the
    list as shipped, so n = 0 already meets the budget (the curve's pure lists would need 2 ops)."""
    measured: list[list[str]] = []

    def measure(keep: list[str]) -> dict[str, float]:
        measured.append(keep)
        return _values(0.0 if HEAD in keep else 1.0)

    budget = {"metric": "kl", "percent": 10, "ranking": "fallback"}
    chosen = _walk(measure, policy="measured_budget", measured_budget=budget, always_keep=["lm_head"])
    assert chosen == [(HEAD, "always_keep: lm_head")]
    assert measured == [[HEAD]]  # n = 0 with the forced op in place: one measurement
    p = fallback_params(policy="measured_budget", measured_budget=budget, always_keep=["lm_head"])
    curve = {**make_curve(), "reference": {"all_int8": _values(1.0), "fp32": _values(0.0)}}
    df = select_phase(phase_scores(make_report(), INVENTORY), p.phase)
    reason = choose(df, p, curve, INVENTORY, measure).attrs["reason"]
    assert reason.startswith("measured_budget: nothing beyond the forced ops (ranking fallback)")
    # without always_keep, the walk goes down the fallback ranking to lm_head (2nd): DOWN, HEAD
    chosen = _walk(measure, policy="measured_budget", measured_budget=budget, always_keep=[])
    assert [m for m, _ in chosen] == [DOWN, HEAD]
    assert "the top 2 ops of the fallback ranking" in chosen[0][1] and "as shipped" in chosen[0][1]


def test_the_walk_scans_n_on_the_shipped_lists():
    """Damage falls by the share of each op kept (planted); the smallest n meeting 10 % is found."""
    share = {DOWN: 0.5, HEAD: 0.2, PATCH: 0.22, EMBED: 0.05, UP: 0.03}

    lists: list[list[str]] = []

    def measure(keep: list[str]) -> dict[str, float]:
        lists.append(keep)
        return _values(1.0 - sum(share[m] for m in keep))

    budget = {"metric": "kl", "percent": 10, "ranking": "fallback"}  # recovered >= 0.9: DOWN+HEAD+PATCH
    chosen = _walk(measure, policy="measured_budget", measured_budget=budget, always_keep=[])
    assert [m for m, _ in chosen] == [DOWN, HEAD, PATCH]
    assert len(lists) == 4 and walk_cost(5) == 6  # n = 0, 1, 2, 3; the plan's bound: every n of 0..5
    assert "leaves 8.0 % of all-int8's kl damage" in chosen[0][1]
    assert "n measured from 0 up, 3 the first meeting it; 4 lists measured" in chosen[0][1]


def test_n_that_ship_the_same_list_share_one_measurement_and_no_list_meeting_it_is_an_error():
    """never_keep drops DOWN (half the damage): n = 0 and n = 1 ship the same list (measured once),
    and no n meets 10 %: the error names the param and what was measured."""
    share = {DOWN: 0.5, HEAD: 0.2, PATCH: 0.22, EMBED: 0.05, UP: 0.03}
    lists: list[list[str]] = []

    def measure(keep: list[str]) -> dict[str, float]:
        lists.append(keep)
        return _values(1.0 - sum(share[m] for m in keep))

    budget = {"metric": "kl", "percent": 10, "ranking": "fallback"}
    with pytest.raises(
        InputError,
        match=r"^params.yaml: fallback.measured_budget.percent: no shipped list measured meets it "
        r"\(n = 0 to 5: 5 lists; the best leaves 50.0 % of all-int8's kl damage",
    ):
        _walk(measure, policy="measured_budget", measured_budget=budget, always_keep=[], never_keep=[DOWN])
    assert [set(k) for k in lists] == [
        set(),
        {HEAD},
        {HEAD, PATCH},
        {HEAD, PATCH, EMBED},
        {HEAD, PATCH, EMBED, UP},
    ]


# The embedded default's committed curve (reports/validation/curve.csv at b375a75: 29 ops, kl
# recovered on the selection split, measured by the curve stage), n = 0..29. Not monotone: the
# fallback ranking gives back 0.960441 at n = 11 and 0.960047 at n = 12.
COMMITTED = {
    "fallback": [
        0,
        0.514051,
        0.684606,
        0.800314,
        0.847386,
        0.855591,
        0.872739,
        0.910931,
        0.917582,
        0.929214,
        0.955194,
        0.960441,
        0.960047,
        0.961092,
        0.968469,
        0.968213,
        0.967666,
        0.970778,
        0.968176,
        0.986434,
        0.980886,
        0.986354,
        0.986224,
        0.988314,
        0.987401,
        0.98515,
        0.989193,
        0.989731,
        0.989475,
        1,
    ],
    "measured": [
        0,
        0.514051,
        0.684606,
        0.800314,
        0.866042,
        0.876031,
        0.891275,
        0.918114,
        0.930731,
        0.949098,
        0.9584,
        0.969777,
        0.973721,
        0.982178,
        0.983289,
        0.984942,
        0.987597,
        0.984077,
        0.984356,
        0.983215,
        0.983243,
        0.984313,
        0.994998,
        0.994834,
        0.994488,
        0.998557,
        1.00167,
        1.0002,
        0.996216,
        1,
    ],
}
OPS = [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(29)]


def _replayed(rankings: tuple[str, ...]):
    """The committed curve's rankings over 29 ops (each its own order of them), and a measure that
    answers a pure top-n list of a ranking with the value the curve stage measured for it."""
    orders = {r: OPS[i:] + OPS[:i] for i, r in enumerate(rankings)}  # distinct orders, same ops
    none = {"top1": None, "nll": None, "logit_se": None}
    curve = {
        "sizes": list(range(30)),
        "targets": [],
        "ops": OPS,
        "rankings": orders,
        "reference": {"all_int8": _values(1.0), "fp32": _values(0.0)},
        "points": [
            {"ranking": r, "n": n, "kept": orders[r][:n], "recovered": {"kl": rec, **none}}
            for r in rankings
            for n, rec in enumerate(COMMITTED[r])
        ],
    }
    by_list = {frozenset(orders[r][:n]): COMMITTED[r][n] for r in rankings for n in range(30)}
    lists: list[list[str]] = []

    def measure(keep: list[str]) -> dict[str, float]:
        lists.append(keep)
        return _values(1.0 - by_list[frozenset(keep)])

    df = pd.DataFrame({"op_name": OPS, "module": OPS, "score": [1.0] * 29, "rank": range(1, 30)})
    return curve, df, measure, lists


def _bisected(shares: list[float], target: float) -> int:
    """The walk before issue 27: n = 0, n = N, then a bisection assuming recovery rises with n."""
    lo, hi = 0, len(shares) - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if shares[mid] >= target - 1e-12 else (mid, hi)
    return hi


def test_the_walk_finds_the_first_n_meeting_the_budget_on_a_curve_that_is_not_monotone():
    """On the committed fallback curve, 1.3 % of all-int8's damage is first met at n = 23
    (0.988314); a bisection answered 26, skipping 23 because n = 25 (0.98515) misses it."""
    assert _bisected(COMMITTED["fallback"], 0.987) == 26  # the defect this test guards
    curve, df, measure, lists = _replayed(("fallback",))
    p = fallback_params(
        policy="measured_budget",
        always_keep=[],
        measured_budget={"metric": "kl", "percent": 1.3, "ranking": "fallback"},
    )
    chosen = choose(df, p, curve, [], measure)
    assert list(chosen["module"]) == curve["rankings"]["fallback"][:23]
    assert len(lists) == 24  # n = 0..23, each list once
    assert "leaves 1.2 % of all-int8's kl damage" in chosen.attrs["reason"]
    assert "n measured from 0 up, 23 the first meeting it; 24 lists measured" in chosen.attrs["reason"]
    assert chosen.attrs["reason"].endswith("the curve's pure lists: n = 23)")
    # the plan's count is the worst case: a budget only every op meets measures every n of 0..29
    lists.clear()
    p = fallback_params(
        policy="measured_budget",
        always_keep=[],
        measured_budget={"metric": "kl", "percent": 0, "ranking": "fallback"},
    )
    assert len(choose(df, p, curve, [], measure)) == 29 and len(lists) == walk_cost(29) == 30


def test_auto_ranking_and_the_walk_agree_on_n_on_a_curve_that_is_not_monotone():
    """1.58 % (recovered >= 0.9842) on the committed curve: the measured ranking meets it first at
    n = 15 (fallback at 19), so auto picks measured for 15 ops; the walk ships those 15, where a
    bisection of the measured ranking answered 21 (0.984077 at n = 17 misses, 0.984313 at 21 meets)."""
    curve, df, measure, lists = _replayed(("fallback", "measured"))
    target = 1 - 1.58 / 100
    assert _bisected(COMMITTED["measured"], target) == 21  # the defect
    ranking, why = auto_ranking(curve, "kl", target)
    assert (ranking, curve_n(curve, "measured", "kl", target), curve_n(curve, "fallback", "kl", target)) == (
        "measured",
        15,
        19,
    )
    assert why == "ranking auto: measured, the fewest ops to reach it on the curve (fallback 19, measured 15)"
    p = fallback_params(
        policy="measured_budget",
        always_keep=[],
        measured_budget={"metric": "kl", "percent": 1.58, "ranking": "auto"},
    )
    chosen = choose(df, p, curve, [], measure)
    assert list(chosen["module"]) == curve["rankings"]["measured"][:15]
    assert len(lists) == 16
    # the notebook path (no measure: the curve's own points) reads the same n
    assert len(choose(df, p, curve, [])) == 15


def test_past_its_cap_the_walk_says_its_n_is_the_smallest_among_those_measured():
    """100 ops, recovery n / 100 but for n = 71 (planted 0.95, between the curve's sizes 70 and 80).
    10 % is met at 71; the walk scans n = 0..63 (its cap), then the curve's sizes meeting it (90,
    100): it ships 90 and says which n it measured, within the plan's count."""
    ops = [f"op{i:03d}" for i in range(100)]
    none = {"top1": None, "nll": None, "logit_se": None}
    curve = {
        "sizes": list(range(0, 101, 10)),
        "targets": [],
        "ops": ops,
        "rankings": {"fallback": ops},
        "reference": {"all_int8": _values(1.0), "fp32": _values(0.0)},
        "points": [
            {"ranking": "fallback", "n": n, "kept": ops[:n], "recovered": {"kl": n / 100, **none}}
            for n in range(0, 101, 10)
        ],
    }
    lists: list[list[str]] = []

    def measure(keep: list[str]) -> dict[str, float]:
        lists.append(keep)
        return _values(0.05 if len(keep) == 71 else 1.0 - len(keep) / 100)

    df = pd.DataFrame({"op_name": ops, "module": ops, "score": [1.0] * 100, "rank": range(1, 101)})
    p = fallback_params(
        policy="measured_budget",
        always_keep=[],
        measured_budget={"metric": "kl", "percent": 10, "ranking": "fallback"},
    )
    chosen = choose(df, p, curve, [], measure)
    assert len(chosen) == 90
    assert [len(k) for k in lists] == [*range(SCAN_MAX), 90]
    assert len(lists) <= walk_cost(100) == SCAN_MAX + CANDIDATE_MAX == 72
    assert (
        "the smallest n among those measured: n = 0 to 63 (64 lists, the walk's cap), then the curve's sizes "
        "90, where its pure lists meet it; n = 64 to 89 off those sizes not measured; 65 lists measured"
    ) in chosen.attrs["reason"]


def test_auto_walks_the_ranking_that_reaches_the_budget_with_the_fewest_ops():
    """Planted curve: the measured ranking reaches 90 % at n = 2, fallback and requant at n = 4."""
    curve = make_curve()
    slow, fast = [0.0, 0.3, 0.6, 0.8, 0.95, 1.0], [0.0, 0.5, 0.93, 0.96, 0.99, 1.0]
    for q in curve["points"]:
        q["recovered"]["kl"] = (fast if q["ranking"] == "measured" else slow)[q["n"]]
    assert auto_ranking(curve, "kl", 0.9) == (
        "measured",
        "ranking auto: measured, the fewest ops to reach it on the curve (fallback 4, requant 4, measured 2)",
    )
    # a tie in n goes to the larger area under the curve up to it, then to fallback, requant, measured
    tie = make_curve()
    assert auto_ranking(tie, "kl", 0.9)[0] == "fallback"
    p = fallback_params(
        policy="measured_budget",
        always_keep=[],
        measured_budget={"metric": "kl", "percent": 10, "ranking": "auto"},
    )
    chosen = choose(select_phase(phase_scores(make_report(), INVENTORY), p.phase), p, curve, INVENTORY)
    assert list(chosen["module"]) == RANKINGS["measured"][:2]


def test_bits_budget_counts_the_forced_ops_first():
    """always_keep's lm_head (300 of 1,300 params) takes its share of the budget and is no item to
    buy: within 0.5 (650 params) the knapsack gets the 350 left (PATCH + UP, 300); before, it
    bought DOWN + PATCH (500) and lm_head came on top (800, over the budget)."""
    budget = {"metric": "kl", "params_share": 0.5}
    assert _choose(policy="bits_budget", bits_budget=budget) == [DOWN, PATCH]  # most sensitive first
    forced = _choose(policy="bits_budget", bits_budget=budget, always_keep=["lm_head"])
    assert forced == [HEAD, PATCH, UP]
    tight = _choose(
        policy="bits_budget", bits_budget={"metric": "kl", "params_share": 0.25}, always_keep=["lm_head"]
    )
    assert tight == [HEAD]  # 25 params of room left: nothing to buy, the forced op stays
