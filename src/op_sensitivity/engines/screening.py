"""Fast screening, exact refinement: every trial in a fast precision, float32 where the ranking is decided.

Why: on a GPU a float32 pass of the 3B costs about twice a TF32 one, but TF32 (or bf16) rounding
reorders ops whose values are close. The keep-list is read from the top of a ranking, so only
the order there must be float32's. ``sensitivity.native.screening`` runs every trial in the fast
precision, then re-measures in float32 every op that could stand in the top ``exact_top`` of a
phase's ranking; the values the stages see are float32 for those ops (bit-identical to a float32
pass: same qparams, same float32 forward) and the report says which values came from where.

The bound. A trial's value is ``v = ||a||^2`` with ``a`` = the logits under the trial's state
minus the float32 reference. The fast forward computes ``a + e`` where ``e`` is its rounding
error at the logits, so by the triangle inequality ``|sqrt(v') - sqrt(v)| <= ||e||``. ``||e||`` is
measured, per confidence batch, at the two ends of the state space: all ops float
(``||fast(fp32) - ref||``) and all ops int8 (``||fast(int8) - exact(int8)||``). With
``margin`` 1 (the default) the bound assumes only that no mixed state rounds worse than the
larger of the two; each value then lies in ``[(sqrt(v') - D)^2, (sqrt(v') + D)^2]`` with
``D = margin * max(...)``. The triangle inequality is tight only when the rounding error points
along ``a``; in practice it is nearly orthogonal to it (on the mid-size random model of
``benchmarks/screening.py`` the refined ops used at most 2.6 % of ``||e||``), so a margin below
1 buys speed by trusting that.
Either way the refined trials check the bound: where a refined op's fast and exact values
differ by more than ``D`` allows, the margin is widened to what was seen (times 1.5) and the
selection is made again, so the refined set only grows until the bound holds on every op that
was measured both ways (``observed_ratio`` in the report).

The selection, per phase, on intervals of the ranking score (a batch mean; a difference of two
curve points for the cumulative requant phase): with ``L`` the ``exact_top``-th largest lower
bound, every op whose upper bound reaches ``L`` could be in the float32 top ``exact_top`` and is
refined (with the curve point before it, for the cumulative phase). Every other op's float32
value is below ``L``, so the top ``exact_top`` of the reported values is float32's top, in
float32's order; below it the order is the screen's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..phases import FALLBACK, REQUANT

WIDEN = 1.5  # a violated bound is widened to the observed ratio times this


@contextlib.contextmanager
def fast_precision(mode: str, device: torch.device) -> Iterator[None]:
    """The screening precision for the forwards inside: TF32 matmuls (cuda) or bf16 autocast."""
    if mode == "tf32":
        matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        yield


def interval(value: float, noise: float) -> tuple[float, float]:
    """Where the float32 value of a trial measured ``value`` in the fast precision can be."""
    if noise == 0:
        return value, value
    root = math.sqrt(max(value, 0.0))
    # the square root's round trip may miss the value by an ulp: the value itself is always inside
    return min(max(root - noise, 0.0) ** 2, value), max((root + noise) ** 2, value)


def observed_ratio(fast: float, exact: float, noise: float) -> float:
    """How much of the measured rounding error one refined trial used: ``|sqrt(v') - sqrt(v)| / noise``
    (above the margin, the bound was too narrow)."""
    diff = abs(math.sqrt(max(fast, 0.0)) - math.sqrt(max(exact, 0.0)))
    if noise > 0:
        return diff / noise
    return 0.0 if diff == 0 else math.inf


@dataclass
class PhaseValues:
    """One phase's per-batch values in scored order; ``exact[b][i]`` says whether (b, i) is float32's."""

    values: list[list[float]]
    exact: list[list[bool]]

    def bounds(self, noise: list[float]) -> tuple[list[float], list[float]]:
        """Per op: the batch mean's interval."""
        n = len(self.values[0])
        lo, hi = [0.0] * n, [0.0] * n
        for b, row in enumerate(self.values):
            for i, v in enumerate(row):
                a, z = (v, v) if self.exact[b][i] else interval(v, noise[b])
                lo[i] += a / len(self.values)
                hi[i] += z / len(self.values)
        return lo, hi


def score_bounds(phase: str, cumulative: bool, lo: list[float], hi: list[float]) -> list[tuple[float, float]]:
    """Intervals of the ranking score, higher = more sensitive (``report.scores`` up to the positive
    factor 1/E): fallback ``-mse``; cumulative requant ``c_i - c_{i-1}``; isolated requant ``mse``."""
    if phase == FALLBACK:
        return [(-z, -a) for a, z in zip(lo, hi, strict=True)]
    if not cumulative:
        return list(zip(lo, hi, strict=True))
    prev_lo, prev_hi = [0.0, *lo[:-1]], [0.0, *hi[:-1]]
    return [(a - ph, z - pl) for a, z, pl, ph in zip(lo, hi, prev_lo, prev_hi, strict=True)]


def to_refine(phase: str, cumulative: bool, bounds: list[tuple[float, float]], exact_top: int) -> set[int]:
    """The trials (op indices) whose float32 values decide the top ``exact_top`` of this phase."""
    top = min(exact_top, len(bounds))
    cut = sorted((a for a, _ in bounds), reverse=True)[top - 1]
    picked = {i for i, (_, z) in enumerate(bounds) if z >= cut}
    if phase == REQUANT and cumulative:
        picked |= {i - 1 for i in picked if i > 0}
    return picked


@dataclass
class ScreeningRecord:
    """What the report says about a screened pass (``metadata.screening``)."""

    precision: str
    exact_top: int
    margin: float  # as asked
    margin_used: float  # after any widening
    noise: list[dict[str, float]]  # per batch: the rounding error at the logits, all-fp32 and all-int8 states
    refined: dict[str, list[str]] = field(default_factory=dict)  # per phase: the ops re-measured in float32
    observed_ratio: float | None = None  # max |sqrt(v') - sqrt(v)| / noise over refined trials

    def doc(self) -> dict[str, Any]:
        return asdict(self)
