"""The chosen list on held-out captions, against random lists and INC's own quantizer (real runs)."""

from pathlib import Path

import pytest

from op_sensitivity.fallback.exports import inc_op_name_dict
from op_sensitivity.model.source import load_model_dir
from op_sensitivity.params import CrosscheckParams, CurveParams
from op_sensitivity.validation.inc_check import whole_check
from op_sensitivity.validation.inputs import open_measurer, scored_and_excluded
from op_sensitivity.validation.plots import pareto
from op_sensitivity.validation.validate import metrics, section, validate_keep_list
from tests.validation.planted import PLANTED


@pytest.fixture(scope="module")
def measured(planted, calibration_dir, eval_dir, tmp_path_factory):
    """The planted pair and the two least damaging ops, validated; the pair also through INC's PTQ."""
    report, inventory = planted["report"], planted["inventory"]
    _, excluded = scored_and_excluded(report)
    params = CurveParams(random_lists=5)
    quiet = planted["curve"]["rankings"]["measured"][-2:]
    with open_measurer(planted["params"], 8, calibration_dir, eval_dir, planted["dir"], report) as measurer:
        good = validate_keep_list(measurer, sorted(PLANTED), excluded, inventory, params)
        bad = validate_keep_list(measurer, quiet, excluded, inventory, params)
        model, _, _ = load_model_dir(planted["dir"])
        fp32_ops = [*sorted(PLANTED), *excluded]  # excluded: lm_head, fp32 in the pass
        ws = tmp_path_factory.mktemp("inc")
        whole_check(good, measurer, model, fp32_ops, inc_op_name_dict, 8, ws, report, CrosscheckParams())
    return good, bad


def test_the_planted_pair_beats_every_random_pair(measured, planted):
    good, _ = measured
    assert good["keep_list"]["ops"] == 2 and good["random"]["n"] == 2 and good["random"]["lists"] == 5
    assert good["chosen"]["recovered"]["kl"] >= 0.9
    assert good["beats_random"]["kl"] is True and good["beats_random"]["logit_se"] is True
    assert good["beats_random"]["top1"] is None  # all-int8 kept every argmax: nothing to give back
    # the same list as the curve's measured top-2: the same numbers
    top2 = next(p for p in planted["curve"]["points"] if p["ranking"] == "measured" and p["n"] == 2)
    assert good["chosen"]["values"] == top2["values"]
    text = section(good, planted["curve"])
    assert "gives back" in text and "does better than every random list" in text
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


def test_a_list_no_better_than_random_is_called_out(measured, planted):
    _, bad = measured
    assert bad["beats_random"]["kl"] is False
    assert "**The list is no better than a random list of its size**" in section(bad, planted["curve"])


def test_inc_own_ptq_matches_the_native_prediction(measured):
    """Same scheme, same calibration sample, same int8 kernels on CPU: near-equality expected."""
    good, _ = measured
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

    good, _ = measured
    pareto(planted["curve"], good, tmp_path / "pareto.png")
    with Image.open(tmp_path / "pareto.png") as im:
        assert im.size[0] > 1000 and len(set(im.convert("L").getdata())) > 10


def test_unscored_ops_are_refused(planted, calibration_dir, eval_dir):
    report = planted["report"]
    with (
        open_measurer(planted["params"], 8, calibration_dir, eval_dir, planted["dir"], report) as measurer,
        pytest.raises(ValueError, match="did not score"),
    ):
        validate_keep_list(measurer, ["lm_head"], set(), planted["inventory"], CurveParams())
    assert Path(planted["dir"]).is_dir()
