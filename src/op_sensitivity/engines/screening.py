"""Fast screening, exact refinement: every trial in a fast precision, float32 where the ranking is decided.

Why: on a GPU a float32 pass of the 3B costs about twice a TF32 one, but TF32 (or bf16) rounding
reorders ops whose values are close. The keep-list is read from the top of a ranking, so only
the order there must be float32's. ``sensitivity.native.screening`` runs every trial in the fast
precision, then re-measures in float32 every op that could stand in the top ``exact_top`` of a
ranking a policy reads: each phase's, and ``both`` (the two combined by mean rank,
``report.scores.combined_scores``). The values the stages see are float32 for those ops
(bit-identical to a float32 pass: same qparams, same float32 forward) and the report says which
values came from where.

The bound, and what it assumes. A trial's value is ``v = ||a||^2`` with ``a`` = the logits under
the trial's state minus the float32 reference. The fast forward computes ``a + e`` where ``e`` is
its rounding error at the logits, so by the triangle inequality ``|sqrt(v') - sqrt(v)| <= ||e||``.
That step is proved; ``||e||`` is not known for a trial's own (mixed) state. It is measured, per
confidence batch, at the two ends of the state space only: all ops float
(``||fast(fp32) - ref||``) and all ops int8 (``||fast(int8) - exact(int8)||``). With
``margin`` 1 (the default) the bound *assumes* that no mixed state rounds worse than the larger of
the two; each value then lies in ``[(sqrt(v') - D)^2, (sqrt(v') + D)^2]`` with
``D = margin * max(...)``. The triangle inequality is tight only when the rounding error points
along ``a``; in practice it is nearly orthogonal to it (on the mid-size random model of
``benchmarks/screening.py`` the refined ops used at most 2.6 % of ``||e||``), so a margin below
1 buys speed by trusting that - a second assumption.

The assumption is checked where it can be: on every refined trial (measured both ways), and on a
seeded sample of :data:`CHECK_SAMPLE` unrefined ops per phase, measured in float32 for that
purpose only (:func:`refine`). Where a trial's fast and exact values differ by more than ``D``
allows, the margin is widened to what was seen (times :data:`WIDEN`), the selection is made
again and, once it settles, a fresh sample is checked; ``metadata.screening`` records every
widening, the sample and the largest share of the bound it used. A sample that holds does not
prove the bound for the ops it did not measure: that stays an assumption.

The selection, on intervals of the ranking score (a batch mean; a difference of two curve points
for the cumulative requant phase):

* per phase (:func:`to_refine`): with ``L`` the ``exact_top``-th largest lower bound, every op
  whose upper bound reaches ``L`` could be in the float32 top ``exact_top`` and is refined (with
  the curve point before it, for the cumulative phase). Every other op's float32 value is below
  ``L``, so the top ``exact_top`` of the reported values is float32's top, in float32's order.
* ``both`` (:func:`combined_to_refine`): an op's combined place is the mean of its two phase
  *ranks*, and a rank depends on every other op's value, so a per-phase top being exact is not
  enough (three ops suffice to flip the combined top 1 while each phase's top 1 stays exact:
  ``tests/engines/test_screening.py``). Each op gets a rank interval per phase
  (:func:`rank_bounds`), hence a mean-rank interval; every op whose interval reaches the
  ``exact_top``-th smallest upper end is a candidate. Candidates are refined in both phases,
  then every op whose order against a candidate is still open, until every candidate's two
  ranks are exact. No other op can then reach the combined top ``exact_top``, whose members and
  order are float32's.

Below ``exact_top`` the order is the screen's (``fallback.keep_list.past_exact_top`` says when a
keep-list reads past it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from ..phases import FALLBACK, PHASES, REQUANT

log = logging.getLogger(__name__)

WIDEN = 1.5  # a violated bound is widened to the observed ratio times this
CHECK_SAMPLE = 8  # unrefined ops per phase measured in float32 to check the bound's assumption


def check_sample(audit: int) -> int:
    """The check's draw per phase: :data:`CHECK_SAMPLE`, or with first_order's ``audit`` (> 0) at most
    the audit. Why: there the check is a second, fresh draw against the bound the audit set, and each
    drawn op costs a float32 trial per batch; one param then sizes both, so a profile that keeps the
    audit small to save exact trials keeps the check small too."""
    return min(audit, CHECK_SAMPLE) if audit > 0 else CHECK_SAMPLE


CHECK_SEED = "op_sensitivity.screening.check"  # the sample's seed: the same pass checks the same ops
# first_order's audit, per phase: the same pass audits the same ops
AUDIT_SEED = "op_sensitivity.screening.audit"
# phase -> per batch, per op (scored order): the values, and whether each is float32's
Values = dict[str, list[list[float]]]
Exact = dict[str, list[list[bool]]]


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


def absolute_interval(value: float, error: float) -> tuple[float, float]:
    """Where the exact value of an estimated trial can be, its error at most ``error`` (first_order)."""
    return max(value - error, 0.0), value + error


def observed_ratio(fast: float, exact: float, noise: float, phase: str | None = None) -> float:
    """How much of the measured rounding error one refined trial used: ``|sqrt(v') - sqrt(v)| / noise``
    (above the margin, the bound was too narrow); with ``phase`` (an estimate of that phase's value):
    :func:`estimate_error` ``/ noise``."""
    root = math.sqrt
    diff = estimate_error(phase, fast, exact) if phase else abs(root(max(fast, 0.0)) - root(max(exact, 0.0)))
    if noise > 0:
        return diff / noise
    return 0.0 if diff == 0 else math.inf


@dataclass
class PhaseValues:
    """One phase's per-batch values in scored order; ``exact[b][i]`` says whether (b, i) is float32's."""

    values: list[list[float]]
    exact: list[list[bool]]

    def bounds(self, noise: list[float], absolute: bool = False) -> tuple[list[float], list[float]]:
        """Per op: the batch mean's interval (``absolute``: an estimate's, :func:`absolute_interval`)."""
        n = len(self.values[0])
        lo, hi = [0.0] * n, [0.0] * n
        widen = absolute_interval if absolute else interval
        for b, row in enumerate(self.values):
            for i, v in enumerate(row):
                a, z = (v, v) if self.exact[b][i] else widen(v, noise[b])
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
    return _with_points_before(phase, cumulative, {i for i, (_, z) in enumerate(bounds) if z >= cut})


def _above(bounds: list[tuple[float, float]], j: int, i: int) -> bool:
    """Whether op ``j`` ranks above op ``i`` whatever their values inside the intervals (the ranking
    sorts by score, higher first, ties by position: the lower index)."""
    return bounds[j][0] > bounds[i][1] or (bounds[j][0] >= bounds[i][1] and j < i)


def rank_bounds(bounds: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Per op: the best and worst rank (1 = top) its score interval allows against the others'."""
    n = len(bounds)
    out = []
    for i in range(n):
        surely = sum(_above(bounds, j, i) for j in range(n) if j != i)
        maybe = sum(not _above(bounds, i, j) for j in range(n) if j != i)
        out.append((1 + surely, 1 + maybe))
    return out


def _with_points_before(phase: str, cumulative: bool, picked: set[int]) -> set[int]:
    """A cumulative requant score is ``c_i - c_{i-1}``: it is exact once both points are."""
    if phase == REQUANT and cumulative:
        return picked | {i - 1 for i in picked if i > 0}
    return picked


def combined_to_refine(
    fallback: list[tuple[float, float]], requant: list[tuple[float, float]], cumulative: bool, exact_top: int
) -> dict[str, set[int]]:
    """The next trials to measure in float32 so that the top ``exact_top`` of ``both`` (mean of the
    two phase ranks, then the mean score, then position) is float32's; empty once it is.

    Candidates: ops whose mean-rank interval reaches the ``exact_top``-th smallest upper end (any
    other op is behind at least ``exact_top`` ops whatever the values). First their scores are
    made exact in both phases; then, where a candidate's rank is still open, every op whose order
    against it is open. A candidate with exact scores and ranks has its float32 place.
    """
    bounds = {FALLBACK: fallback, REQUANT: requant}
    ranks = {p: rank_bounds(b) for p, b in bounds.items()}
    n = len(fallback)
    lo = [ranks[FALLBACK][i][0] + ranks[REQUANT][i][0] for i in range(n)]  # twice the mean rank
    hi = [ranks[FALLBACK][i][1] + ranks[REQUANT][i][1] for i in range(n)]
    cut = sorted(hi)[min(exact_top, n) - 1]
    candidates = [i for i in range(n) if lo[i] <= cut]
    out = {p: {i for i in candidates if bounds[p][i][0] != bounds[p][i][1]} for p in PHASES}
    if not any(out.values()):
        for p, b in bounds.items():
            for i in candidates:
                if ranks[p][i][0] != ranks[p][i][1]:
                    out[p] |= {j for j in range(n) if j != i and not _above(b, j, i) and not _above(b, i, j)}
    return {p: _with_points_before(p, cumulative, out[p]) for p in PHASES}


def selection(
    values: Values,
    exact: Exact,
    noise: dict[str, list[float]],
    cumulative: bool,
    exact_top: int,
    done: dict[str, set[int]],
    absolute: bool = False,
) -> dict[str, set[int]]:
    """The next trials (not in ``done``) whose float32 values the top ``exact_top`` of a ranking a
    policy reads still needs: each phase's (:func:`to_refine`) first, then ``both``'s
    (:func:`combined_to_refine`), whose rank intervals the phases' refinement has narrowed by then.
    ``noise``: per phase and batch, the bound ``D``. Empty once every such top is float32's."""
    bounds = {
        p: score_bounds(p, cumulative, *PhaseValues(values[p], exact[p]).bounds(noise[p], absolute))
        for p in PHASES
    }
    todo = {p: to_refine(p, cumulative, bounds[p], exact_top) - done[p] for p in PHASES}
    if any(todo.values()):
        return todo
    both = combined_to_refine(bounds[FALLBACK], bounds[REQUANT], cumulative, exact_top)
    return {p: both[p] - done[p] for p in PHASES}


def within_budget(
    phase: str, cumulative: bool, bounds: list[tuple[float, float]], todo: set[int], room: int
) -> set[int]:
    """At most ``room`` of the trials ``todo``, for the ops most likely in the top: by the upper end
    of their score interval (ties by position), each op with the curve point before it where its
    cumulative requant score needs it."""
    chosen: set[int] = set()
    for i in sorted(todo, key=lambda i: (-bounds[i][1], i)):
        need = _with_points_before(phase, cumulative, {i}) & todo
        if len(chosen | need) <= room:
            chosen |= need
    return chosen


@dataclass
class Refinement:
    """What :func:`refine` did: the float32 trials it measured and what they showed of the bound."""

    margin_used: float
    refined: dict[str, set[int]]  # measured for the selection
    checked: dict[str, set[int]]  # measured to check the bound's assumption (a seeded sample)
    observed_ratio: float  # max share of the unscaled bound a refined trial used
    check_ratio: float | None  # the same over the sampled trials (None: nothing left to sample)
    widened: list[dict[str, Any]]  # every widening: {from, to, by: refined | sample}
    # first_order: the seeded audit (measured first); per phase and batch, the bound before the
    # margin; the values before any measurement; per phase, (drawn, pool) of each uniform draw
    audited: dict[str, set[int]] = field(default_factory=dict)
    ends: dict[str, list[float]] = field(default_factory=dict)
    estimate: Values = field(default_factory=dict)
    draws: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # exact_budget: per phase that reached it, the trials the selection still needed (empty: none)
    unsettled: dict[str, set[int]] = field(default_factory=dict)


def estimate_error(phase: str, estimate: float, exact: float) -> float:
    """The error of an estimated value that could hide an op from a top: for fallback, an estimate
    above the exact value (the op gives back more than estimated; one below only brings it into
    contention, where it is measured); for a cumulative curve point, either way (an increment is a
    difference of two points)."""
    return max(estimate - exact, 0.0) if phase == FALLBACK else abs(estimate - exact)


def audit_errors(
    fast: Values, values: Values, picked: dict[str, set[int]], cumulative: bool, floor: list[float]
) -> dict[str, list[float]]:
    """Per phase and batch: the largest :func:`estimate_error` over the audited trials (for the
    cumulative curve, over the audited points and the points before them, which were measured too),
    at least ``floor`` (per batch)."""
    out = {}
    for p in PHASES:
        idx = _with_points_before(p, cumulative, picked[p])
        out[p] = [
            max([floor[b], *(estimate_error(p, fast[p][b][i], values[p][b][i]) for i in idx)])
            for b in range(len(fast[p]))
        ]
    return out


def refine(
    values: Values,
    exact: Exact,
    ends: list[float] | dict[str, list[float]],
    cumulative: bool,
    exact_top: int,
    margin: float,
    measure: Callable[[dict[str, set[int]]], None],
    sample: int = CHECK_SAMPLE,
    audit: int = 0,
    seed: str = AUDIT_SEED,
    budget: int | None = None,
) -> Refinement:
    """Measure in float32 what the selection needs, then check the bound on a sample; repeat.

    ``values``/``exact``: the screened pass's, updated in place by ``measure(todo)`` (phase -> op
    indices: their float32 trials in every batch). ``ends``: per batch (or per phase and batch), the
    larger rounding error measured at the two ends of the state space (the bound before the margin).
    ``audit`` > 0 (first_order): the values are estimates with no bound of their own; a seeded
    sample of ``audit`` ops per phase is measured first, and the largest error it shows
    (:func:`estimate_error`), per phase and batch and at least ``ends`` (then a list: per batch, the
    estimate's own measured error scale), is the bound (absolute, not the rounding model's square
    roots). ``budget``: at most this many trials per phase for the selection (:func:`within_budget`
    picks them); a phase that reaches it selects no more and gets at most one more check sample,
    and what it still needed is returned as ``unsettled`` (its top, and ``both``'s, may then not be
    float32's).
    """
    fast = {p: [list(row) for row in values[p]] for p in PHASES}
    done: dict[str, set[int]] = {p: set() for p in PHASES}
    out = Refinement(margin, {p: set() for p in PHASES}, {p: set() for p in PHASES}, 0.0, None, [])
    out.estimate = fast
    rng = random.Random(CHECK_SEED)
    absolute = audit > 0
    if absolute:
        n = len(values[FALLBACK][0])
        pick = {p: set(random.Random(f"{seed}.{p}").sample(range(n), min(audit, n))) for p in PHASES}
        measured = {p: _with_points_before(p, cumulative, pick[p]) for p in PHASES}
        measure(measured)
        for p in PHASES:
            done[p] |= measured[p]
        out.audited = pick
        out.draws = {p: [(len(pick[p]), n)] for p in PHASES}
        ends = audit_errors(fast, values, pick, cumulative, ends)
    elif not isinstance(ends, dict):
        ends = {p: list(ends) for p in PHASES}
    out.ends = ends

    def worst(todo: dict[str, set[int]]) -> float:
        return max(
            (
                observed_ratio(fast[p][b][i], values[p][b][i], ends[p][b], p if absolute else None)
                for p, idx in todo.items()
                for b in range(len(values[p]))
                for i in idx
            ),
            default=0.0,
        )

    def widen(seen: float, by: str) -> None:
        new = seen * WIDEN
        log.warning(
            "screening: a %s op's fast value differs from float32 by %.3gx the measured %s, "
            "above the margin %.3g; widening it to %.3g and selecting again",
            by,
            seen,
            "audit's largest error" if absolute else "rounding error",
            out.margin_used,
            new,
        )
        out.widened.append({"from": out.margin_used, "to": new, "by": by})
        out.margin_used = new

    capped: set[str] = set()

    def noise() -> dict[str, list[float]]:
        return {p: [out.margin_used * e for e in ends[p]] for p in PHASES}

    def within(todo: dict[str, set[int]]) -> dict[str, set[int]]:
        todo = {p: set() if p in capped else t for p, t in todo.items()}
        if budget is None:
            return todo
        for p in PHASES:
            room = budget - len(out.refined[p])
            if len(todo[p]) > room:
                lo_hi = PhaseValues(values[p], exact[p]).bounds(noise()[p], absolute)
                bounds = score_bounds(p, cumulative, *lo_hi)
                todo[p] = within_budget(p, cumulative, bounds, todo[p], room)
                capped.add(p)
        return todo

    def settled() -> Refinement:
        if capped:
            still = selection(values, exact, noise(), cumulative, exact_top, done, absolute)
            out.unsettled = {p: still[p] for p in PHASES if still[p]}
        return out

    while True:
        todo = within(selection(values, exact, noise(), cumulative, exact_top, done, absolute))
        if any(todo.values()):
            measure(todo)
            for p in PHASES:
                done[p] |= todo[p]
                out.refined[p] |= todo[p]
            out.observed_ratio = max(out.observed_ratio, worst(todo))
            if out.observed_ratio > out.margin_used:
                widen(out.observed_ratio, "refined")
            continue
        # the selection holds under the bound: check the bound's assumption on ops it left alone (a
        # phase at its budget is checked once: a wider bound could not select more there)
        pool = {
            p: []
            if p in capped and out.checked[p]
            else [i for i in range(len(values[p][0])) if i not in done[p]]
            for p in PHASES
        }
        pick = {p: set(rng.sample(pool[p], min(sample, len(pool[p])))) for p in PHASES}
        if not any(pick.values()):
            return settled()
        for p in PHASES:
            out.draws.setdefault(p, []).append((len(pick[p]), len(pool[p])))
        measure(pick)
        for p in PHASES:
            done[p] |= pick[p]
            out.checked[p] |= pick[p]
        seen = worst(pick)
        out.check_ratio = max(out.check_ratio or 0.0, seen)
        if seen <= out.margin_used:
            return settled()
        widen(seen, "sample")


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
    # the bound's assumption checked on a seeded sample of unrefined ops (measured in float32 too):
    # {ops: {phase: [op]}, trials, observed_ratio (None: every op was refined)}
    check: dict[str, Any] = field(default_factory=dict)
    widened: list[dict[str, Any]] = field(default_factory=list)  # {from, to, by: refined | sample}
    # first_order only (omitted otherwise): the audit (:func:`audit_record`), what the estimate
    # measured per batch, and the bound per phase and batch before the margin (the audit's largest error)
    audit: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)
    bound: dict[str, list[float]] = field(default_factory=dict)
    # exact_budget set (omitted otherwise): {exact_budget, unsettled: {phase: [ops the selection still
    # needed when the phase reached the budget]}}; an unsettled phase's top may not be float32's
    budget: dict[str, Any] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("audit", "estimate", "bound", "budget"):
            if not doc[key]:
                del doc[key]
        return doc


def phase_scores(phase: str, cumulative: bool, rows: list[list[float]]) -> list[float]:
    """Per op, the ranking score of a phase's per-batch values (higher = more sensitive; as
    :func:`score_bounds` with no error)."""
    mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    return [a for a, _ in score_bounds(phase, cumulative, mean, mean)]


def _top(scores: list[float], k: int) -> list[int]:
    """The top ``k`` by score, ties by position (the report's order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    rho = pd.Series(a).corr(pd.Series(b), method="spearman")
    return None if math.isnan(rho) else float(rho)


def audit_record(
    done: Refinement, values: Values, cumulative: bool, exact_top: int, names: list[str]
) -> dict[str, Any]:
    """What the audit says of the estimate on this run, per phase (``metadata.screening.audit``).

    * ``spearman``: estimated against exact scores over the audited ops (a uniform draw of all ops).
    * ``recall``: the share of the final top ``exact_top`` (exact: contention measured it) that the
      estimate alone put in its own top ``exact_top``.
    * ``top`` / ``top_estimated``: the final top and the estimate's own, in order.
    * ``found``: ops the check sample measured outside contention that stand in the final top (each
      widened the bound, and the run said so).
    * ``escape``: the chance that one op the estimate is blind to (its estimate far below its value,
      so never in contention) is missed: it is caught only if a uniform draw measures it, the audit
      (``audit`` of all ops) or a check (``sample`` of the ops not measured yet), so the product of
      ``1 - drawn / pool`` over the draws.
    """
    out: dict[str, Any] = {}
    for p in PHASES:
        est = phase_scores(p, cumulative, done.estimate[p])
        final = phase_scores(p, cumulative, values[p])
        audited = sorted(done.audited.get(p, set()))
        top = _top(final, exact_top)
        escape = 1.0
        for drawn, pool in done.draws.get(p, []):
            escape *= 1 - drawn / pool if pool else 0.0  # an empty pool: every op was measured
        out[p] = {
            "ops": [names[i] for i in audited],
            # measured exactly: the audited ops and, on the cumulative curve, the points before them
            "measured": [names[i] for i in sorted(_with_points_before(p, cumulative, set(audited)))],
            "spearman": _spearman([est[i] for i in audited], [final[i] for i in audited]),
            "recall": len(set(top) & set(_top(est, exact_top))) / len(top),
            "top": [names[i] for i in top],  # the final top exact_top (exact), in order
            "top_estimated": [names[i] for i in _top(est, exact_top)],  # the estimate's own, in order
            "found": [names[i] for i in sorted(done.checked[p] & set(top))],
            "escape": escape,
        }
    return out
