from dataclasses import replace

import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.fallback.policy import auto_ranking, choose, walk_cost
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


def test_the_walk_bisects_n_on_the_shipped_lists():
    """Damage falls by the share of each op kept (planted); the smallest n meeting 10 % is found."""
    share = {DOWN: 0.5, HEAD: 0.2, PATCH: 0.22, EMBED: 0.05, UP: 0.03}

    lists: list[list[str]] = []

    def measure(keep: list[str]) -> dict[str, float]:
        lists.append(keep)
        return _values(1.0 - sum(share[m] for m in keep))

    budget = {"metric": "kl", "percent": 10, "ranking": "fallback"}  # recovered >= 0.9: DOWN+HEAD+PATCH
    chosen = _walk(measure, policy="measured_budget", measured_budget=budget, always_keep=[])
    assert [m for m, _ in chosen] == [DOWN, HEAD, PATCH]
    assert len(lists) <= walk_cost(5) == 5  # n = 0, n = 5, then 3, 1, 2 (the plan's bound)
    assert "leaves 8.0 % of all-int8's kl damage" in chosen[0][1]


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
