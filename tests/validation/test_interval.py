"""The bootstrap interval of a recovered share over the test images, on hand-made per-image sums."""

import math

import numpy as np
import pytest

from op_sensitivity.validation.interval import LEVEL, RESAMPLES, SEED, bootstrap_recovered, per_image

KEPT = [0.10, 0.50, 0.20, 0.90, 0.30, 0.00]  # each image's damage under the list
INT8 = [1.00, 1.20, 0.80, 1.50, 0.90, 1.10]  # and all-int8


def _percentile(sorted_values: list[float], q: float) -> float:
    """The linear-interpolation percentile (numpy's default), written out."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def test_the_bounds_are_the_percentiles_of_the_resampled_shares():
    """Recomputed one resample at a time in plain Python from the same seeded draws of images."""
    draws = np.random.default_rng(SEED).integers(0, len(KEPT), size=(RESAMPLES, len(KEPT)))
    shares = sorted(1 - sum(KEPT[i] for i in row) / sum(INT8[i] for i in row) for row in draws.tolist())
    got = bootstrap_recovered(KEPT, INT8)
    assert got["low"] == pytest.approx(_percentile(shares, (1 - LEVEL) / 2), abs=1e-12)
    assert got["high"] == pytest.approx(_percentile(shares, (1 + LEVEL) / 2), abs=1e-12)
    assert got["level"] == 0.95 and got["resamples"] == RESAMPLES == 2000 and got["images"] == 6
    point = 1 - sum(KEPT) / sum(INT8)
    assert got["low"] < point < got["high"]


def test_one_image_fully_back_one_not_spans_nothing_to_everything():
    """Two images, one given back whole and one not at all: a resample's share is 0, 1/2 or 1 (a
    quarter of the resamples each end), so the 2.5 % and 97.5 % percentiles are exactly 0 and 1."""
    got = bootstrap_recovered([0.0, 1.0], [1.0, 1.0])
    assert (got["low"], got["high"]) == (0.0, 1.0)


def test_the_same_share_on_every_image_has_no_spread():
    got = bootstrap_recovered([0.5, 0.25, 2.0, 1.5], [1.0, 0.5, 4.0, 3.0])
    assert got["low"] == got["high"] == 0.5


def test_the_interval_is_seeded():
    assert bootstrap_recovered(KEPT, INT8) == bootstrap_recovered(KEPT, INT8)
    other = bootstrap_recovered(KEPT, INT8, seed=SEED + 1)
    assert other["seed"] == SEED + 1 and other != bootstrap_recovered(KEPT, INT8)


def test_no_interval_without_two_images_or_any_damage():
    assert bootstrap_recovered([0.1], [1.0]) is None
    assert bootstrap_recovered([0.0, 0.0], [0.0, 0.0]) is None


def test_resamples_where_int8_did_no_damage_are_dropped():
    """Image 2 took no damage all-int8: a resample of it alone (1 in 27 for three draws of 3) has
    no share; the rest still bound it."""
    got = bootstrap_recovered([0.2, 0.4, 0.0], [1.0, 1.0, 0.0])
    draws = np.random.default_rng(SEED).integers(0, 3, size=(RESAMPLES, 3))
    assert got["resamples"] == int((draws != 2).any(axis=1).sum()) < RESAMPLES


def test_the_captions_of_one_image_are_resampled_together():
    """Per-sample sums are added per image (ascending image id) before resampling."""
    assert per_image([1.0, 2.0, 3.0, 4.0], [7, 5, 7, 9]).tolist() == [2.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="3 sample values for 2 image ids"):
        per_image([1.0, 2.0, 3.0], [1, 2])
