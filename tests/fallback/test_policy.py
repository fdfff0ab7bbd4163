from dataclasses import replace

import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.fallback.policy import choose
from op_sensitivity.report.scores import phase_scores, select_phase
from tests.handmade import DOWN, EMBED, HEAD, INVENTORY, PATCH, UP, fallback_params, make_curve, make_report


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
