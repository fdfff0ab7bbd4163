import json

import pytest
from PIL import Image

from op_sensitivity.errors import InputError
from op_sensitivity.report.scores import phase_scores
from op_sensitivity.report.stability import (
    ChosenList,
    read_chosen_list,
    render_section,
    stability,
    stability_metrics,
    write_stability,
)
from tests.handmade import DOWN, EMBED, HEAD, INVENTORY, PATCH, UP, make_report


def batched_report(fallback: list[dict], requant: list[dict]) -> dict:
    """The hand-made report with one raw value per op and confidence batch (mse = their mean)."""
    report = make_report()
    report["metadata"]["calibration"]["confidence_batches"] = len(fallback)
    for phase, batches in (("fallback", fallback), ("requant", requant)):
        for op in report["phases"][phase]["ops"]:
            values = [b[op["module"]] for b in batches]
            op["mse_per_batch"], op["mse"] = values, sum(values) / len(values)
    return report


REQUANT_CURVE = {PATCH: 1.0, UP: 1.0, EMBED: 3.0, DOWN: 6.0, HEAD: 10.0}  # E = 10
# DOWN removes 90 % of the error in every batch; the others trade places
PLANTED = [
    {PATCH: 8.0, UP: 9.5, EMBED: 8.5, DOWN: 1.0, HEAD: 9.0},
    {PATCH: 9.0, UP: 8.0, EMBED: 9.5, DOWN: 1.2, HEAD: 8.5},
    {PATCH: 8.6, UP: 9.0, EMBED: 8.0, DOWN: 0.9, HEAD: 9.4},
]
# the mean ranks HEAD, DOWN first; batch 0 alone agrees, batch 1 alone has UP first and DOWN last
DISAGREE = [
    {PATCH: 8.0, UP: 10.0, EMBED: 9.0, DOWN: 1.0, HEAD: 5.0},
    {PATCH: 8.0, UP: 2.0, EMBED: 9.0, DOWN: 10.0, HEAD: 5.8},
]


def test_a_planted_top_op_is_stable():
    report = batched_report(PLANTED, [REQUANT_CURVE] * 3)
    doc = stability(report, INVENTORY, ChosenList([DOWN], "fallback", "top_k"))
    assert doc["stable"] is True and doc["verdict"].startswith("stable: the top 1 of the fallback ranking")
    assert stability_metrics(doc) == {"top_same": 1.0}
    lst = doc["list"]
    assert lst["ops"] == [DOWN] and lst["matches_ranking"] and lst["in_doubt"] == []
    assert lst["per_batch_same"] == [True, True, True] and lst["top5_same"] == 1.0
    top = doc["phases"]["fallback"]["ops"][0]
    assert (
        top["module"] == DOWN
        and top["bootstrap"]["rank"] == [1, 1]
        and top["batch_interval"]["rank"] == [1, 1]
    )


def test_a_list_that_takes_nothing_from_the_ranking_is_judged_by_its_top_5():
    """measured_budget may add nothing beyond the forced ops: then the top 5 alone decide."""
    doc = stability(batched_report(PLANTED, [REQUANT_CURVE] * 3), INVENTORY, ChosenList([], "fallback", "x"))
    assert doc["stable"] is True and "takes no op from the fallback ranking" in doc["verdict"]
    assert stability_metrics(doc) == {"top_same": None} and doc["list"]["top5_same"] == 1.0


def test_batches_that_disagree_are_not_stable_and_name_the_ops_in_doubt():
    report = batched_report(DISAGREE, [REQUANT_CURVE] * 2)
    ranking = list(phase_scores(report, INVENTORY)["fallback"]["module"])
    assert ranking[:2] == [HEAD, DOWN]
    doc = stability(report, INVENTORY, ChosenList([HEAD, DOWN], "fallback", "top_k"))
    lst = doc["list"]
    assert doc["stable"] is False and doc["verdict"].startswith("add calibration samples: the top 2")
    assert lst["per_batch_same"] == [True, False]
    # 2 batches: resamples are batch 0 twice (1/4), batch 1 twice (1/4) or both (1/2); only batch 1
    # twice loses the set, and there its top 2 (UP, HEAD) shares 1 of 3 ops with the chosen set
    assert doc["bootstrap"] == "exact" and doc["resamples"] == 3 and doc["seed"] is None
    assert lst["top_same"] == 0.75
    assert lst["list_jaccard"] == pytest.approx(3 / 4 + 1 / 4 * 1 / 3, abs=1e-15)
    assert {d["module"]: d["chosen"] for d in lst["in_doubt"]} == {DOWN: True, UP: False}
    down = next(o for o in doc["phases"]["fallback"]["ops"] if o["module"] == DOWN)
    assert down["per_batch"]["rank"] == [1, 5] and down["batch_interval"]["rank"] == [1, 5]
    assert "the top 2 of the fallback ranking changes in 25 % of resamples (exact)" in doc["verdict"]


def test_intervals_hold_the_per_batch_values_and_the_point():
    requant = [REQUANT_CURVE, {**REQUANT_CURVE, DOWN: 7.0, HEAD: 12.0}, {**REQUANT_CURVE, HEAD: 11.0}]
    doc = stability(batched_report(PLANTED, requant), INVENTORY, ChosenList([DOWN], "fallback", "top_k"))
    assert doc["all_int8"]["per_batch"] == [10.0, 12.0, 11.0] and doc["all_int8"]["point"] == 11.0
    for phase in ("fallback", "requant"):
        for op in doc["phases"][phase]["ops"]:
            lo, hi = op["batch_interval"]["score"]
            assert all(lo <= s <= hi for s in op["per_batch"]["score"])
            assert (
                lo - 1e-12 <= op["score"] <= hi + 1e-12
            )  # the mean's score: a weighted mean of the batches'
            b_lo, b_hi = op["bootstrap"]["score"]
            assert lo - 1e-12 <= b_lo <= b_hi <= hi + 1e-12
            r_lo, r_hi = op["batch_interval"]["rank"]
            assert all(r_lo <= r <= r_hi for r in op["per_batch"]["rank"])
    # each batch alone is scored like a report of that batch only
    alone = phase_scores(batched_report(PLANTED[1:2], requant[1:2]), INVENTORY)
    for phase in ("fallback", "requant"):
        want = dict(zip(alone[phase]["module"], alone[phase]["score"], strict=True))
        for op in doc["phases"][phase]["ops"]:
            assert op["per_batch"]["score"][1] == pytest.approx(want[op["module"]])


def test_one_confidence_batch_is_unknown_with_null_metrics():
    doc = stability(make_report(), INVENTORY, ChosenList([DOWN, HEAD], "fallback", "top_k"))
    assert doc["stable"] is None and doc["verdict"].startswith("unknown: one confidence batch")
    assert stability_metrics(doc) == {"top_same": None}
    assert doc["resamples"] is None
    assert all(op["bootstrap"] is None for op in doc["phases"]["fallback"]["ops"])
    assert "unknown: one confidence batch" in render_section(doc)


# DOWN's fallback raw value is 0 in batch 0 and 10 (= E) elsewhere: its score in a resample is the
# share of batch 0 in it; HEAD scores 1 - raw/E everywhere, the other ops 0
def only_batch_0_matters(n: int, head_raw: float) -> dict:
    batches = [{PATCH: 10.0, UP: 10.0, EMBED: 10.0, DOWN: 10.0, HEAD: head_raw} for _ in range(n)]
    batches[0][DOWN] = 0.0
    return batched_report(batches, [REQUANT_CURVE] * n)


def test_two_batches_give_the_exact_share_of_the_one_resample_that_changes_the_top():
    """DOWN scores 0, 1/2 or 1 (batch 0 in the resample 0, 1 or 2 times), HEAD 0.6: HEAD, the top 1
    of the mean, loses it only in the resample of batch 0 twice, probability exactly 1/4 (Monte
    Carlo said 22..28 %, by seed). The resample of both batches is the mean itself, so with 2
    batches a share is 1/2, 3/4 or 1."""
    doc = stability(only_batch_0_matters(2, 4.0), INVENTORY, ChosenList([HEAD], "fallback", "top_k"))
    lst = doc["list"]
    assert doc["bootstrap"] == "exact" and doc["resamples"] == 3
    assert lst["top_same"] == 0.75 and lst["per_batch_same"] == [False, True]
    assert lst["in_doubt"] == [
        {"module": HEAD, "rank": 1, "chosen": True, "share_in_top_k": 0.75},
        {"module": DOWN, "rank": 2, "chosen": False, "share_in_top_k": 0.25},
    ]
    assert doc["verdict"] == (
        "add calibration samples: the top 1 of the fallback ranking changes in 25 % of resamples (exact)"
    )
    section = render_section(doc)
    assert "exact: all 3 distinct resamples of the 2 confidence batches" in section
    assert "| same top-k set in                     | 75 %" in section
    assert "| model.language_model.layers.0.mlp.down_proj | False    | 25 %" in section


def test_three_batches_give_the_multinomial_probabilities():
    """Batch 0 drawn c times out of 3 with probability C(3,c) 2^(3-c) / 27: 8, 12, 6, 1 / 27. DOWN
    (score c/3) beats HEAD (0.1) when c >= 1: 19/27; its score interval is the weighted 5th..95th
    percentile: 0 (mass 8/27 >= 5 %) .. 2/3 (mass up to it 26/27 >= 95 %, up to 1/3 only 20/27)."""
    doc = stability(only_batch_0_matters(3, 9.0), INVENTORY, ChosenList([DOWN], "fallback", "top_k"))
    assert doc["bootstrap"] == "exact" and doc["resamples"] == 10  # C(5, 3)
    assert doc["list"]["top_same"] == 19 / 27
    down = next(o for o in doc["phases"]["fallback"]["ops"] if o["module"] == DOWN)
    # rank 5 when batch 0 is not drawn: DOWN then ties the other three at 0, last by position
    assert down["bootstrap"] == {"score": [0.0, pytest.approx(2 / 3, abs=1e-15)], "rank": [1, 5]}
    assert down["per_batch"]["score"] == [1.0, 0.0, 0.0]
    assert "changes in 29.63 % of resamples (exact)" in doc["verdict"]  # 8/27


def test_more_batches_than_enumerable_are_drawn_seeded():
    """7 batches have C(13, 7) = 1716 distinct resamples > 1000: Monte Carlo, seeded."""
    report = only_batch_0_matters(7, 9.0)
    chosen = ChosenList([DOWN], "fallback", "top_k")
    a, b = stability(report, INVENTORY, chosen), stability(report, INVENTORY, chosen)
    assert a["bootstrap"] == "monte_carlo" and a["resamples"] == 1000 and a["seed"] == 0
    assert json.dumps(a) == json.dumps(b)
    # DOWN scores c/7 > 0.1 when batch 0 is drawn at all: 1 - (6/7)^7 = 0.660 exactly
    assert a["list"]["top_same"] == pytest.approx(1 - (6 / 7) ** 7, abs=0.05)
    assert a["list"]["top_same"] != 1 - (6 / 7) ** 7
    again = stability(report, INVENTORY, chosen, seed=1)
    assert again["seed"] == 1 and again["list"]["top_same"] != a["list"]["top_same"]
    assert "(1000 resamples of the 7 confidence batches with replacement, seed 0)" in render_section(a)
    # with as many draws allowed as there are distinct resamples, the same report is exact
    exact = stability(report, INVENTORY, chosen, resamples=1716)
    assert exact["bootstrap"] == "exact" and exact["list"]["top_same"] == 1 - 6**7 / 7**7


def test_a_list_walked_on_the_measured_ranking_is_measured_on_the_fallback_one():
    report = batched_report(DISAGREE, [REQUANT_CURVE] * 2)
    doc = stability(report, INVENTORY, ChosenList([UP, PATCH], "measured", "measured_budget"))
    lst = doc["list"]
    assert lst["ranking"] == "fallback" and "does not apply" in lst["note"]
    assert lst["ops"] == [HEAD, DOWN]  # the fallback ranking's top 2, not the list's ops


def test_never_keep_ops_are_left_out_of_the_top_k():
    report = batched_report(PLANTED, [REQUANT_CURVE] * 3)
    ranking = list(phase_scores(report, INVENTORY)["fallback"]["module"])
    chosen = ChosenList([ranking[1]], "fallback", "top_k", never_keep=["model.language_model.layers.*"])
    lst = stability(report, INVENTORY, chosen)["list"]
    assert ranking[0] == DOWN and lst["matches_ranking"]  # the second op is the top 1 without DOWN
    assert DOWN not in lst["top5"] and DOWN not in {d["module"] for d in lst["in_doubt"]}
    assert len(lst["top5"]) == 4


def test_both_phases_combined_ranking():
    report = batched_report(PLANTED, [REQUANT_CURVE] * 3)
    lst = stability(report, INVENTORY, ChosenList([DOWN], "both", "top_k"))["list"]
    assert lst["ranking"] == "both" and lst["matches_ranking"]


def _keep_list(tmp_path, policy, ops):
    path = tmp_path / "fallback_ops.json"
    path.write_text(json.dumps({"schema_version": 2, "policy": policy, "ops": ops}))
    return path


def test_read_chosen_list_takes_the_policy_pick_only(tmp_path):
    policy = {"name": "top_k", "params": {"k": 1}, "phase": "requant", "never_keep": ["x"]}
    ops = [
        {"module": HEAD, "reason": "top_k: rank <= 1"},
        {"module": PATCH, "reason": "always_keep: model.visual.*"},
        {"module": UP, "reason": "fused group g (with x)"},
    ]
    assert read_chosen_list(_keep_list(tmp_path, policy, ops)) == ChosenList(
        [HEAD], "requant", "top_k", ["x"]
    )
    auto = {
        "name": "measured_budget",
        "params": {"ranking": "auto"},
        "phase": "fallback",
        "ranking": "requant",
    }
    why = "measured_budget: the top 1 ops of the requant ranking (ranking auto: requant, the fewest ...)"
    chosen = read_chosen_list(_keep_list(tmp_path, auto, [{"module": HEAD, "reason": why}]))
    assert chosen.walked == "requant"  # policy.ranking: the one walked, auto resolved
    bits = {"name": "bits_budget", "params": {}, "phase": "fallback"}
    assert read_chosen_list(_keep_list(tmp_path, bits, [])).walked == "single_op"
    with pytest.raises(InputError, match="not a keep-list of schema_version 2"):
        read_chosen_list(_keep_list(tmp_path, {"name": "top_k"}, []))


def test_an_op_the_report_never_scored_is_refused():
    with pytest.raises(InputError, match="not ops of the sensitivity report"):
        stability(make_report(), INVENTORY, ChosenList(["model.other"], "fallback", "top_k"))


def test_write_stability_writes_json_metrics_and_plot(tmp_path):
    doc = stability(
        batched_report(PLANTED, [REQUANT_CURVE] * 3), INVENTORY, ChosenList([DOWN], "fallback", "top_k")
    )
    write_stability(doc, tmp_path)
    assert json.loads((tmp_path / "rank/stability_metrics.json").read_text()) == stability_metrics(doc)
    assert json.loads((tmp_path / "rank/stability.json").read_text())["verdict"] == doc["verdict"]
    with Image.open(tmp_path / "plots/rank_intervals.png") as im:
        assert im.size[0] > 300 and len(set(im.convert("L").getdata())) > 10
    section = render_section(doc)
    assert section.startswith("## Stability") and "plots/rank_intervals.png" in section
