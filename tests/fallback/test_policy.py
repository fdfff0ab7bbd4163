import pytest

from op_sensitivity.errors import InputError
from op_sensitivity.fallback.policy import choose
from op_sensitivity.report.scores import phase_scores, select_phase
from tests.handmade import DOWN, EMBED, HEAD, INVENTORY, PATCH, fallback_params, make_report


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
