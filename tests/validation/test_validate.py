"""The chosen list on the test split, against random lists and INC's own quantizer, and the ops
each ranking needs there (real runs)."""

import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from op_sensitivity.data.calibration import load_calibration
from op_sensitivity.errors import InputError
from op_sensitivity.fallback.exports import inc_op_name_dict
from op_sensitivity.model.source import load_model_dir
from op_sensitivity.params import CrosscheckParams, CurveParams
from op_sensitivity.validation.curve import random_lists
from op_sensitivity.validation.inc_check import whole_check
from op_sensitivity.validation.inputs import open_measurer, scored_and_excluded
from op_sensitivity.validation.measure import SELECTION, TEST
from op_sensitivity.validation.metrics import recovered
from op_sensitivity.validation.plots import pareto
from op_sensitivity.validation.validate import (
    metrics,
    rankings_metrics,
    recovered_intervals,
    section,
    validate_cost,
    validate_keep_list,
)
from tests.helpers import REPO
from tests.validation.planted import PLANTED

PARAMS = CurveParams(random_lists=5)


@pytest.fixture(scope="module")
def measured(planted, calibration_dir, test_dir, tmp_path_factory):
    """The planted pair and the two least damaging ops, validated on the test split; the pair also
    through INC's PTQ. Third: the test split's recovered share of every ranking's top n and of
    every random list, measured directly (for the rankings table)."""
    report, inventory, curve = planted["report"], planted["inventory"], planted["curve"]
    _, excluded = scored_and_excluded(report)
    quiet = curve["rankings"]["measured"][-2:]
    with open_measurer(
        planted["params"], 8, calibration_dir, test_dir, planted["dir"], report, TEST
    ) as measurer:
        good = validate_keep_list(measurer, sorted(PLANTED), excluded, inventory, PARAMS, curve)
        bad = validate_keep_list(measurer, quiet, excluded, inventory, PARAMS, curve)
        ops, all_int8 = measurer.scored, measurer.measure([])
        direct = {
            name: [
                recovered(measurer.measure(curve["rankings"][name][:n]), all_int8)["kl"]
                for n in range(len(ops) + 1)
            ]
            for name in curve["rankings"]
        }
        direct["random"] = [
            statistics.fmean(
                recovered(measurer.measure(keep), all_int8)["kl"]
                for keep in random_lists(ops, n, 5, PARAMS.seed)
            )
            for n in range(len(ops) + 1)
        ]
        model, _, _ = load_model_dir(planted["dir"])
        fp32_ops = [*sorted(PLANTED), *excluded]  # excluded: lm_head, fp32 in the pass
        ws = tmp_path_factory.mktemp("inc")
        whole_check(good, measurer, model, fp32_ops, inc_op_name_dict, 8, ws, report, CrosscheckParams())
    return good, bad, direct


def test_the_planted_pair_beats_every_random_pair(measured, planted):
    good, _, _ = measured
    assert good["keep_list"]["ops"] == 2 and good["random"]["n"] == 2 and good["random"]["lists"] == 5
    assert good["chosen"]["recovered"]["kl"] >= 0.9
    assert good["beats_random"]["kl"] is True and good["beats_random"]["logit_se"] is True
    assert good["beats_random"]["top1"] is None  # all-int8 kept every argmax: nothing to give back
    assert good["test"] == {"samples": 6, "caption_tokens": good["reference"]["all_int8"]["tokens"]}
    text = section(good, planted["curve"])
    assert "gives back" in text and "does better than every random list" in text
    assert "on the test split, images neither the calibration nor the choice used" in text
    widened = [{"group": "m.{gate_proj,up_proj}", "added": ["m.gate_proj"], "params_added": 2048}]
    assert "Fused group `m.{gate_proj,up_proj}` kept whole" in section(good, planted["curve"], widened)
    assert "2,048 params" in section(good, planted["curve"], widened)
    headline = metrics(good)  # the headline metric's numbers only, named after it
    assert headline == {
        "kl_int8": good["reference"]["all_int8"]["kl"],
        "kl_kept": good["chosen"]["values"]["kl"],
        "kl_recovered": good["chosen"]["recovered"]["kl"],
        "kl_random": good["random"]["recovered"]["kl"]["mean"],
    }
    assert headline["kl_int8"] > headline["kl_kept"] > 0 and headline["kl_recovered"] > headline["kl_random"]


def test_validate_measures_on_the_test_split_not_the_selection_split(measured, planted):
    """The curve (selection split) and validate (test split) score other images: the all-int8
    reference and the same list's values differ; validate's stage reads data/test, never data/selection."""
    good, _, _ = measured
    curve = planted["curve"]
    assert good["reference"]["all_int8"] != curve["reference"]["all_int8"]
    top2 = next(p for p in curve["points"] if p["ranking"] == "measured" and p["n"] == 2)
    assert set(top2["kept"]) == PLANTED and good["chosen"]["values"] != top2["values"]
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["validate"]
    assert "data/test" in stage["deps"] and "--test data/test" in stage["cmd"]
    assert not any("selection" in str(d) for d in stage["deps"]) and "selection" not in stage["cmd"]


def test_a_measurer_holds_the_calibration_split_and_one_held_out_split(planted, calibration_dir, test_dir):
    report = planted["report"]
    with pytest.raises(InputError, match="the selection split expected, got the test split"):
        open_measurer(planted["params"], 8, calibration_dir, test_dir, planted["dir"], report, SELECTION)


def test_the_rankings_table_is_the_smallest_n_measured_directly(measured, planted):
    """Every n is on the planted curve's grid (16 ops): validate's crossings are the smallest n
    whose directly measured test-split share reaches 50 / 90 / 99 %, random: the lists' mean."""
    good, _, direct = measured
    assert set(good["rankings"]) == {"fallback", "requant", "measured", "random"}
    for name, shares in direct.items():
        want = {
            f"{s:g}": next((n for n, got in enumerate(shares) if got >= s - 1e-12), None)
            for s in PARAMS.crossings
        }
        assert good["rankings"][name] == want, name
    assert good["rankings"]["measured"]["0.9"] <= 2  # the planted pair
    files = rankings_metrics(good, PARAMS.crossings)
    assert files["random"] == {
        "n50": good["rankings"]["random"]["0.5"],
        "n90": good["rankings"]["random"]["0.9"],
        "n99": good["rankings"]["random"]["0.99"],
    }
    assert all(set(row) == {"n50", "n90", "n99"} for row in files.values())
    text = section(good, planted["curve"])
    assert "ops needed to give back 50 / 90 / 99 % of the all-int8 kl damage, test split" in text.lower()
    for label in ("| INC fallback |", "| INC requant |", "| measured |", "| random |"):
        assert label in text


def test_a_sparse_grid_gives_the_same_crossings_where_the_curve_is_monotone(
    measured, planted, calibration_dir, test_dir
):
    """curve.json's grid is log-spaced past 32 ops: the crossings are bisected inside a grid gap,
    the same n as every n measured wherever the share rises monotonically."""
    good, _, direct = measured
    n_ops = len(planted["curve"]["ops"])  # 16: lm_head is kept fp32 by the pass
    curve = {**planted["curve"], "sizes": [0, 1, 2, n_ops]}
    report, inventory = planted["report"], planted["inventory"]
    _, excluded = scored_and_excluded(report)
    with open_measurer(
        planted["params"], 8, calibration_dir, test_dir, planted["dir"], report, TEST
    ) as measurer:
        sparse = validate_keep_list(measurer, sorted(PLANTED), excluded, inventory, PARAMS, curve)
    for name, shares in direct.items():
        if all(a <= b + 1e-12 for a, b in zip(shares, shares[1:], strict=False)):
            assert sparse["rankings"][name] == good["rankings"][name], name


def test_the_recovered_share_comes_with_an_interval_over_the_test_images(measured, planted):
    """A seeded 95 % bootstrap over the 6 test images brackets the split's own share, for every
    metric with a share; said in words beside the share in the section."""
    good, bad, _ = measured
    for doc in (good, bad):
        intervals = doc["chosen"]["recovered_interval"]
        assert set(intervals) == set(doc["chosen"]["recovered"])
        for m, share in doc["chosen"]["recovered"].items():
            ci = intervals[m]
            if share is None:
                assert ci is None, m  # top1: all-int8 kept every argmax
                continue
            assert ci["low"] <= share <= ci["high"], (m, share, ci)
            assert ci["level"] == 0.95 and ci["images"] == 6 and 0 < ci["resamples"] <= 2000
    ci = good["chosen"]["recovered_interval"]["kl"]
    assert ci["low"] < ci["high"] and ci["resamples"] == 2000
    text = section(good, planted["curve"])
    words = "(95 % interval over the 6 test images, a seeded bootstrap of 2000 resamples: "
    assert f"{words}{100 * ci['low']:.1f} % to {100 * ci['high']:.1f} %)" in text


def test_the_interval_leaves_the_split_unchanged_and_is_seeded(measured, planted, calibration_dir, test_dir):
    """Per-image sums on: the split's values are the same to the bit, the images are the test
    manifest's, and the same measurements give the same interval as validate_keep_list wrote."""
    good, _, _ = measured
    report = planted["report"]
    keep = sorted(PLANTED)
    with open_measurer(
        planted["params"], 8, calibration_dir, test_dir, planted["dir"], report, TEST
    ) as measurer:
        plain, int8_plain = measurer.measure(keep), measurer.measure([])
        kept, int8 = (
            measurer.measure_totals(keep, per_sample=True),
            measurer.measure_totals([], per_sample=True),
        )
        images = measurer.images()
    assert kept.values() == plain == good["chosen"]["values"]
    assert int8.values() == int8_plain == good["reference"]["all_int8"]
    assert sum(kept.per_sample.tokens) == plain["tokens"] and len(kept.per_sample.kl) == 6
    # the split's KL is one float32 reduction over its tokens, the per-sample sums are others: they
    # agree to float32 summation (measured 2.2e-6 relative under xdist), not to the bit
    assert sum(kept.per_sample.kl) / plain["tokens"] == pytest.approx(plain["kl"], rel=1e-4)
    _, records = load_calibration(test_dir, TEST)
    assert images == [r.image_id for r in records] and len(set(images)) == 6
    again = recovered_intervals(good["chosen"]["recovered"], kept.per_sample, int8.per_sample, images)
    assert again == good["chosen"]["recovered_interval"]


def test_the_section_says_when_there_is_no_interval(measured, planted):
    good, _, _ = measured
    one = {**good, "chosen": {**good["chosen"], "recovered_interval": {"kl": None}}}
    assert "(no interval: fewer than 2 test images" in section(one, planted["curve"])


def test_validate_cost_bounds_the_configurations():
    cost = validate_cost(17, PARAMS)  # every n: 16 inner sizes per row, 3 rankings + 5 random lists
    assert cost == {"keep_list": 8, "rankings_max": 8 * 16, "total_max": 8 + 128}
    # the 3B grid (25 inner sizes, widest gap 83): 7 bisection steps a crossing, 3 within 5 %
    exact, loose = (
        validate_cost(417, replace(PARAMS, max_points="auto")),
        validate_cost(417, replace(PARAMS, max_points="auto", crossing_tolerance=0.05)),
    )
    rows, crossings = 3 + PARAMS.random_lists, len(PARAMS.crossings)
    assert exact["rankings_max"] == rows * (25 + crossings * 7)
    assert loose["rankings_max"] == rows * (25 + crossings * 3)


def test_a_list_no_better_than_random_is_called_out(measured, planted):
    _, bad, _ = measured
    assert bad["beats_random"]["kl"] is False
    assert "**The list is no better than a random list of its size**" in section(bad, planted["curve"])


def test_inc_own_ptq_matches_the_native_prediction(measured):
    """Same scheme, same calibration sample, same int8 kernels on CPU: near-equality expected."""
    good, _, _ = measured
    inc = good["inc_ptq"]
    assert (
        inc["compared"]["model"] == "whole"
        and inc["compared"]["params"] < inc["compared"]["whole_max_params"]
    )
    assert inc["values"]["tokens"] == inc["native_prediction"]["tokens"] > 0
    assert inc["rel_diff"]["logit_se"] < 1e-4, inc
    assert inc["rel_diff"]["kl"] < 1e-3, inc
    assert inc["values"]["nll"] == pytest.approx(inc["native_prediction"]["nll"], rel=1e-6)


def test_pareto_png_is_drawn(measured, planted, tmp_path):
    from PIL import Image

    good, _, _ = measured
    pareto(planted["curve"], good, tmp_path / "pareto.png")
    with Image.open(tmp_path / "pareto.png") as im:
        assert im.size[0] > 1000 and len(set(im.convert("L").getdata())) > 10


def test_unscored_ops_are_refused(planted, calibration_dir, test_dir):
    report = planted["report"]
    with (
        open_measurer(
            planted["params"], 8, calibration_dir, test_dir, planted["dir"], report, TEST
        ) as measurer,
        pytest.raises(ValueError, match="did not score"),
    ):
        validate_keep_list(
            measurer, ["lm_head"], set(), planted["inventory"], CurveParams(), planted["curve"]
        )
    assert Path(planted["dir"]).is_dir()
