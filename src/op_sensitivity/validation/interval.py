"""How far to trust a recovered share: a seeded percentile bootstrap over the held-out images.

The recovered share (``metrics.recovered``) is one number over the whole test split; with a few
images it moves with which images the split drew. Resampling the images with replacement and
recomputing the share on each resample shows how much: the interval holds the middle ``level``
of the resampled shares (numpy's default, linear, percentiles).

Images, not samples, are resampled: several captions of one image (``captions_per_image: all``)
are not independent draws, so their per-sample sums are added per image first. A resample's
share is ``1 - sum(damage kept) / sum(damage all-int8)`` over its images (``SampleSums.damage``):
the split's own formula, as the captions' token counts cancel between the two. A resample whose
images took no damage all-int8 has no share and is dropped (``resamples`` counts those kept).

Seeded (``SEED``, numpy's ``default_rng``): the same per-image sums give the same interval, so
``validation.json`` stays a function of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


def per_image(values: Sequence[float], images: Sequence[int]) -> np.ndarray:
    """Per-sample sums added per image (images in ascending id order): the unit to resample."""
    if len(values) != len(images):
        raise ValueError(f"{len(values)} sample values for {len(images)} image ids")
    _, index = np.unique(np.asarray(images), return_inverse=True)
    return np.bincount(index.ravel(), weights=np.asarray(values, dtype=np.float64))


def bootstrap_recovered(
    kept: Sequence[float],
    all_int8: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> dict[str, Any] | None:
    """The ``level`` percentile interval of the recovered share over ``resamples`` resamples of the
    images with replacement; ``kept`` and ``all_int8``: each image's damage sums, the list's and
    all-int8's. None with fewer than 2 images or when no resample took damage all-int8 (no share
    to bound)."""
    kept, worst = np.asarray(kept, dtype=np.float64), np.asarray(all_int8, dtype=np.float64)
    n = len(kept)
    if n < 2 or len(worst) != n:
        return None
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    num, den = kept[draws].sum(1), worst[draws].sum(1)
    defined = den > 0
    if not defined.any():
        return None
    shares = 1.0 - num[defined] / den[defined]
    low, high = np.quantile(shares, [(1 - level) / 2, (1 + level) / 2])
    return {
        "low": float(low),
        "high": float(high),
        "level": level,
        "resamples": int(defined.sum()),
        "images": n,
        "seed": seed,
    }
