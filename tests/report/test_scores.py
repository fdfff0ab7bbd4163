import math

import pytest

from op_sensitivity.report.scores import agreement, phase_scores, select_phase
from tests.handmade import DOWN, EMBED, HEAD, INVENTORY, PATCH, UP, make_report


def _order(df):
    return list(df["module"])


def test_scores_have_one_direction_and_exact_values():
    s = phase_scores(make_report(), INVENTORY)
    fb, rq = s["fallback"], s["requant"]
    # fallback: (E - mse) / E; tie PATCH/EMBED at 0.2 broken by position.
    assert _order(fb) == [DOWN, HEAD, PATCH, EMBED, UP]
    assert dict(zip(fb["module"], fb["score"], strict=True)) == pytest.approx(
        {DOWN: 0.5, HEAD: 0.4, PATCH: 0.2, EMBED: 0.2, UP: 0.0}
    )
    assert list(fb["rank"]) == [1, 2, 3, 4, 5]
    assert list(fb["mse"]) == [5.0, 6.0, 8.0, 8.0, 10.0]  # raw values kept beside the score
    # requant: increments of the cumulative curve; they sum to the whole all-int8 error.
    assert _order(rq) == [HEAD, DOWN, EMBED, PATCH, UP]
    assert list(rq["score"]) == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    assert rq["score"].sum() == pytest.approx(1.0)
    assert dict(zip(fb["module"], fb["depth"], strict=True)) == {
        DOWN: 0,
        HEAD: 1,
        PATCH: -1,
        EMBED: -1,
        UP: 0,
    }


def test_phase_agreement_is_spearman_with_ties():
    rho, worst = agreement(phase_scores(make_report(), INVENTORY))
    assert rho == pytest.approx(8.5 / math.sqrt(95))  # average ranks for the fallback tie
    assert set(worst.loc[worst["rank_gap"] == 1, "op_name"]) == {
        "model.language_model.layers.0.mlp.down_proj",
        "lm_head.module",
        PATCH,
        "model.language_model.embed_tokens.module",
    }


def test_combined_phase_ranks_by_mean_rank():
    both = select_phase(phase_scores(make_report(), INVENTORY), "both")
    assert _order(both) == [DOWN, HEAD, EMBED, PATCH, UP]
    assert list(both["mean_rank"]) == [1.5, 1.5, 3.5, 3.5, 5.0]
