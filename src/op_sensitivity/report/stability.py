"""How stable is the ranking, and the keep-list chosen from it, under another calibration draw?

Computed from what the pass already measured: every op's raw value per confidence batch
(``mse_per_batch`` of ``op_sensitivity.json``), no new forwards.

* **Per batch**: each confidence batch scored alone with the formulas of ``report.scores`` (its
  own all-int8 error ``E_b``: the last point of that batch's requant curve; where the engine
  measured ``E`` directly, ``metadata.all_int8_mse``, only the mean is stored, so every batch
  uses it) and ranked; the interval is min..max over the batches.
* **Bootstrap over confidence batches**: resamples of the ``n`` batches with replacement; per
  resample the mean raw value per op (and the mean ``E``) -> scores -> ranks, exactly as
  ``report.scores`` does for the whole set. Two ways, by how many distinct resamples there are
  (``C(2n-1, n)``: the multisets of ``n`` batches; 3 for 2 batches, 462 for 6, 1716 for 7):

  - **exact** (``bootstrap: exact``) when that count is at most ``resamples`` (``RESAMPLES``, so
    ``n <= 6`` by default): every distinct resample once, weighted by its multinomial probability
    ``n! / prod(k_b!) / n^n`` (``k_b``: how often batch b is in it). No more rows than Monte Carlo
    would draw, and the shares are the bootstrap's own values, not an estimate with noise (2
    batches: batch 0 twice 1/4, batch 1 twice 1/4, both 1/2). The interval is the weighted
    5th..95th percentile, inverted CDF (the smallest value whose cumulative probability reaches
    5 % / 95 %: a value that occurs).
  - **Monte Carlo** (``bootstrap: monte_carlo``) above it: ``resamples`` seeded draws (``SEED``);
    the interval is the 5th..95th percentile (ranks: the lower / higher neighbour, so a rank
    interval holds ranks that occurred).

Why batches and not samples: calibration is per batch (a batch's qparams come from that batch's
sample, and its errors are measured on the same sample), so a batch is one (calibration,
measurement) pair, and resampling batches resamples exactly what the pass computed. Resampling
samples *within* a batch would need new forwards (new qparams, new errors); so does a draw of
more batches than were measured. With one confidence batch there is nothing to resample: the
verdict is ``unknown: one confidence batch`` and the metrics are null, never a fake interval.
With ``n`` batches the bootstrap has only ``C(2n-1, n)`` distinct resamples (3 for INC's default
2): at 2 batches, a share >= 90 % needs each batch alone to agree with the mean.

The chosen list (``fallback_ops.json``) comes in as plain data (:class:`ChosenList`, read by
:func:`read_chosen_list`: the ops its policy picked from a ranking, without ``always_keep`` and
fused-group widening, and the ranking it walked). With ``k`` such ops, each resample's top-``k``
set of that ranking (``never_keep`` ops left out, as the policy left them out) is compared with
the chosen set. A list walked on the
``measured`` ranking (single-op damage on captions, not per confidence batch) or by
``bits_budget`` (a knapsack over that damage) has no per-batch values to resample: the report
says so and measures the top-``k`` of the fallback ranking instead, as the stability of INC's
ranking.

``reports/rank/stability.json`` (schema_version 2)::

    schema_version: 2
    confidence_batches: int
    bootstrap: exact | monte_carlo | null   null with one confidence batch (nothing to resample)
    resamples: int | null          exact: the distinct resamples enumerated; monte_carlo: the draws
    seed: int | null               the Monte-Carlo seed (null: exact or one batch, nothing drawn)
    all_int8: {point, per_batch: [E_b], source}   source: requant_last_point | measured (mean only)
    phases:
      fallback | requant:
        ops: [Interval]            most sensitive first (the report's ranking)
    list:
      policy: str                  the keep-list's policy
      walked: str                  the ranking it walked (fallback | requant | both | measured | single_op)
      ranking: str                 the ranking measured here (walked, or fallback where walked can't be)
      note: str | null             why ranking != walked
      k: int                       ops the policy picked from the ranking (the chosen top-k)
      ops: [module]                that set; for a list not walked here, the top k of ``ranking``
      matches_ranking: bool        the set is the top k of the report's ranking (false: another report?)
      top_same: float | null       share of resamples whose top-k set equals ``ops`` (exact:
                                   their summed probability)
      list_jaccard: float | null   mean Jaccard index of the resamples' top-k sets with ``ops``
      top5: [module]               the report's top 5 of ``ranking`` (never_keep ops left out)
      top5_same: float | null      share of resamples with the same top-5 set
      per_batch_same: [bool]       each batch alone gives the same top-k set
      in_doubt: [{module, rank, chosen, share_in_top_k}]   chosen ops in the top k of < 90 % of
                                   resamples, other ops in it in > 10 %
    stable: bool | null            top_same >= 0.9 and top5_same >= 0.9 (null: one batch)
    verdict: str                   plain words: stable / add calibration samples: ... / unknown: ...

Interval: module, op_name, tower, rank, score (the report's: ``report.scores``), per_batch: {score:
[...], rank: [...]}, batch_interval: {score: [min, max], rank: [min, max]}, bootstrap: {score:
[p5, p95], rank: [p5, p95]} | null.

``reports/rank/stability_metrics.json`` (DVC metrics): ``top_same`` (:func:`stability_metrics`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..atomic import dump_json, read_json  # noqa: E402
from ..errors import InputError  # noqa: E402
from ..inventory import OpInfo  # noqa: E402
from ..phases import BOTH, FALLBACK, PHASES, REQUANT  # noqa: E402
from .scores import all_int8_error, all_int8_source, phase_scores  # noqa: E402

SCHEMA_VERSION = 2
RESAMPLES = 1000  # Monte-Carlo draws, and the most distinct resamples enumerated exactly
EXACT, MONTE_CARLO = "exact", "monte_carlo"
SEED = 0
STABLE_SHARE = 0.9  # a set is stable when it recurs in at least this share of resamples
DOUBT_SHARE = 0.1  # an op outside the chosen set is in doubt when it enters it this often
TOP = 5
PLOT_TOP = 20
ONE_BATCH = "unknown: one confidence batch"
RANKED_HERE = (FALLBACK, REQUANT, BOTH)  # rankings with per-batch values to resample


@dataclass(frozen=True)
class ChosenList:
    """A keep-list as plain data: the ops its policy picked from a ranking, and which ranking."""

    modules: list[str]  # without always_keep and fused-group widening
    walked: str  # fallback | requant | both | measured | single_op
    policy: str
    never_keep: list[str] = field(default_factory=list)


KEEP_LIST_SCHEMA = 2  # fallback_ops.json (op_sensitivity.fallback.keep_list)


def read_chosen_list(path: Path) -> ChosenList:
    """The keep-list's ranked pick from ``fallback_ops.json``, read as plain data (the report layer
    sits below ``fallback``): the ops whose ``reason`` starts ``<policy>:`` (not ``always_keep:``,
    not ``fused group ...``), and the ranking walked: ``policy.phase`` for top_k, top_fraction,
    threshold and error_budget; the ranking ``measured_budget`` walked (``policy.ranking``, auto
    resolved); ``single_op`` for ``bits_budget`` (a knapsack over measured single-op damage)."""
    doc = read_json(path, "keep-list", "fallback_list")
    policy = doc.get("policy") if isinstance(doc, dict) else None
    ok = isinstance(doc, dict) and doc.get("schema_version") == KEEP_LIST_SCHEMA
    ok = ok and isinstance(policy, dict) and isinstance(policy.get("name"), str)
    ok = ok and isinstance(policy.get("phase"), str) and isinstance(policy.get("params"), dict)
    ok = ok and isinstance(policy.get("never_keep", []), list)
    ok = ok and isinstance(doc.get("ops"), list)
    ok = ok and all(
        isinstance(o, dict) and isinstance(o.get("module"), str) and isinstance(o.get("reason"), str)
        for o in doc["ops"]
    )
    if not ok:
        raise InputError(
            f"{path}: not a keep-list of schema_version {KEEP_LIST_SCHEMA} (expected policy {{name, phase, "
            "params}} and ops with module and reason)"
        )
    name = policy["name"]
    picked = [o for o in doc["ops"] if o["reason"].startswith(f"{name}:")]
    if name == "bits_budget":
        walked = "single_op"
    elif name == "measured_budget":
        walked = str(policy.get("ranking") or policy["params"].get("ranking", FALLBACK))  # auto resolved
    else:
        walked = policy["phase"]
    return ChosenList(
        [o["module"] for o in picked], walked, name, [str(g) for g in policy.get("never_keep", [])]
    )


@dataclass(frozen=True)
class _Phase:
    """One phase's raw values: ops in position order, ``values[b, j]`` batch b's raw value of op j."""

    modules: list[str]
    values: np.ndarray
    cumulative: bool


def _raw(report: dict[str, Any], phase: str) -> _Phase:
    ops = sorted(report["phases"][phase]["ops"], key=lambda o: o["position"])
    n = {len(o["mse_per_batch"]) for o in ops}
    if len(n) != 1 or 0 in n:
        raise InputError(f"sensitivity report: phases.{phase}: ops have {sorted(n)} values per batch")
    values = np.array([o["mse_per_batch"] for o in ops], dtype=float).T
    cumulative = phase == REQUANT and report["phases"][REQUANT].get("cumulative", True)
    return _Phase([o["module"] for o in ops], values, cumulative)


def _batch_errors(report: dict[str, Any], requant: _Phase) -> np.ndarray:
    """``E`` per batch: the requant curve's last point, or the measured mean for every batch."""
    if all_int8_source(report) == "measured" or not requant.cumulative:
        return np.full(requant.values.shape[0], all_int8_error(report))
    return requant.values[:, -1]


def _scores(phase: str, raw: np.ndarray, errors: np.ndarray, cumulative: bool) -> np.ndarray:
    """``report.scores``' formulas on rows of raw values (one row per batch or resample)."""
    e = errors[:, None]
    if phase == FALLBACK:
        return (e - raw) / e
    if cumulative:
        return np.diff(raw, axis=1, prepend=0.0) / e
    return raw / e


def _order_keys(score: np.ndarray) -> list[np.ndarray]:
    """np.lexsort keys, last = primary: score descending, ties by position (column order)."""
    return [np.broadcast_to(np.arange(score.shape[1]), score.shape), -score]


def _ranks_from_keys(keys: list[np.ndarray]) -> np.ndarray:
    order = np.lexsort(keys, axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, order.shape[1] + 1)[None, :].repeat(len(order), 0), -1)
    return ranks


class _Spectrum:
    """Scores and ranks of both phases (and their combination) for a stack of weightings of the
    batches: row r weighs batch b by ``weights[r, b]`` (one-hot rows: each batch alone)."""

    def __init__(self, raw: dict[str, _Phase], errors: np.ndarray, weights: np.ndarray):
        self.modules = raw[FALLBACK].modules
        self.score, self.rank = {}, {}
        e = weights @ errors
        for phase in PHASES:
            mean = weights @ raw[phase].values
            s = _scores(phase, mean, e, raw[phase].cumulative)
            if raw[phase].modules != self.modules:  # align on the fallback phase's ops
                col = {m: j for j, m in enumerate(raw[phase].modules)}
                s = s[:, [col[m] for m in self.modules]]
            self.score[phase] = s
            self.rank[phase] = _ranks_from_keys(_order_keys(s))

    def keys(self, ranking: str) -> list[np.ndarray]:
        """Sort keys of a ranking, ``report.scores.combined_scores`` for ``both``."""
        if ranking != BOTH:
            return _order_keys(self.score[ranking])
        mean_rank = (self.rank[FALLBACK] + self.rank[REQUANT]) / 2
        mean_score = (self.score[FALLBACK] + self.score[REQUANT]) / 2
        return [*_order_keys(mean_score), mean_rank]

    def top_sets(self, ranking: str, eligible: np.ndarray, k: int) -> np.ndarray:
        """Boolean [rows, ops]: in the top k of the ranking among the eligible ops."""
        cols = np.flatnonzero(eligible)
        order = np.lexsort([key[:, cols] for key in self.keys(ranking)], axis=-1)[:, :k]
        mask = np.zeros((order.shape[0], len(self.modules)), dtype=bool)
        np.put_along_axis(mask, cols[order], True, -1)
        return mask


def distinct_resamples(n: int) -> int:
    """How many distinct resamples ``n`` batches have: multisets of size n, ``C(2n-1, n)``."""
    return math.comb(2 * n - 1, n)


@dataclass(frozen=True)
class _Resamples:
    """The bootstrap's resamples: ``counts[r, b]`` = how often batch b is in resample r.

    Exact: each distinct resample once, ``mult[r]`` its multinomial count ``n! / prod(k_b!)`` out of
    ``total = n^n`` equally likely draws; shares and quantiles are computed on these integers, so a
    share is the exact ratio rounded once to a float. Monte Carlo: one row per seeded draw.
    """

    counts: np.ndarray
    mult: np.ndarray
    total: int
    exact: bool

    @classmethod
    def enumerate(cls, n: int) -> _Resamples:
        counts, mult = [], []
        for combo in itertools.combinations_with_replacement(range(n), n):
            k = np.bincount(np.array(combo), minlength=n)
            counts.append(k)
            mult.append(math.factorial(n) // math.prod(math.factorial(int(c)) for c in k))
        assert sum(mult) == n**n and len(mult) == distinct_resamples(n)
        return cls(np.stack(counts), np.array(mult, dtype=np.int64), n**n, True)

    @classmethod
    def draw(cls, n: int, resamples: int, seed: int) -> _Resamples:
        draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
        counts = np.stack([np.bincount(row, minlength=n) for row in draws])
        return cls(counts, np.ones(resamples, dtype=np.int64), resamples, False)

    def share(self, hit: np.ndarray) -> np.ndarray:
        """Share of resamples (by probability when exact) where ``hit`` (bool, rows first) holds."""
        if not self.exact:
            return hit.mean(axis=0)
        return (self.mult @ hit.astype(np.int64)) / self.total

    def mean(self, x: np.ndarray) -> float:
        """Mean of a per-resample value (probability-weighted when exact)."""
        return float(x.mean()) if not self.exact else float(self.mult @ x / self.total)

    def percentiles(self, x: np.ndarray, integer: bool) -> list[list[float]]:
        """Per column, the 5th..95th percentile: Monte Carlo as :func:`_percentiles`; exact, the
        weighted inverted CDF (the smallest value whose probability mass up to it reaches the
        percentile, compared on integers: a value that occurs, with no interpolation)."""
        if not self.exact:
            return _percentiles(x, integer)
        order = np.argsort(x, axis=0, kind="stable")
        xs = np.take_along_axis(x, order, axis=0)
        mass = np.cumsum(self.mult[order], axis=0) * 100  # percent units x total, integers
        cols = np.arange(x.shape[1])
        lo = xs[(mass < 5 * self.total).sum(axis=0), cols]
        hi = xs[(mass < 95 * self.total).sum(axis=0), cols]
        kind = int if integer else float
        return [[kind(a), kind(b)] for a, b in zip(lo, hi, strict=True)]


def _percentiles(x: np.ndarray, integer: bool) -> list[list[float]]:
    if integer:
        lo = np.percentile(x, 5, axis=0, method="lower")
        hi = np.percentile(x, 95, axis=0, method="higher")
        return [[int(a), int(b)] for a, b in zip(lo, hi, strict=True)]
    lo, hi = np.percentile(x, [5, 95], axis=0)
    return [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]


def _intervals(
    df: pd.DataFrame,
    modules: list[str],
    per_batch: _Spectrum,
    boot: _Spectrum | None,
    draws: _Resamples | None,
    phase: str,
) -> list[dict[str, Any]]:
    col = {m: j for j, m in enumerate(modules)}
    bs = bi = None
    if boot is not None and draws is not None:
        bs = draws.percentiles(boot.score[phase], integer=False)
        bi = draws.percentiles(boot.rank[phase], integer=True)
    out = []
    for r in df.itertuples():
        j = col[r.module]
        scores = [float(v) for v in per_batch.score[phase][:, j]]
        ranks = [int(v) for v in per_batch.rank[phase][:, j]]
        out.append(
            {
                "module": r.module,
                "op_name": r.op_name,
                "tower": r.tower,
                "rank": int(r.rank),
                "score": float(r.score),
                "per_batch": {"score": scores, "rank": ranks},
                "batch_interval": {"score": [min(scores), max(scores)], "rank": [min(ranks), max(ranks)]},
                "bootstrap": None if boot is None else {"score": bs[j], "rank": bi[j]},
            }
        )
    return out


def _share(x: float, exact: bool = False) -> str:
    """A share in words: Monte Carlo to the percent (its noise is ~1-2 %); exact to 4 significant
    digits (75 %, 70.37 %), as computed."""
    return f"{100 * x:.4g} %" if exact else f"{100 * x:.0f} %"


def _list_stability(
    chosen: ChosenList,
    point: _Spectrum,
    per_batch: _Spectrum,
    boot: _Spectrum | None,
    draws: _Resamples | None = None,
) -> dict[str, Any]:
    modules = point.modules
    unknown = sorted(set(chosen.modules) - set(modules))
    if unknown:
        raise InputError(
            f"keep-list: ops {unknown[:5]} are not ops of the sensitivity report (a keep-list of another "
            "model or report? rerun the fallback_list stage)"
        )
    eligible = np.array([not any(fnmatchcase(m, g) for g in chosen.never_keep) for m in modules])
    ranking, note = chosen.walked, None
    if ranking not in RANKED_HERE:
        what = {
            "measured": "the measured ranking",
            "single_op": f"{chosen.policy} (measured single-op damage)",
        }.get(ranking, f"{chosen.policy} (ranking {ranking}, not resolved)")
        ranking = FALLBACK
        note = (
            f"the list was chosen by {what}, measured on captions, not per confidence batch: the bootstrap "
            "does not apply to it; shown instead: the same number of top ops of the fallback ranking, "
            "the stability of INC's ranking"
        )
    k = len(chosen.modules)
    point_top = point.top_sets(ranking, eligible, k)[0]
    picked = set(chosen.modules)
    original = np.array([m in picked for m in modules]) if note is None else point_top
    n_top = min(TOP, int(eligible.sum()))
    top5 = point.top_sets(ranking, eligible, n_top)[0]
    order = np.lexsort([key[0] for key in point.keys(ranking)])
    rank = {modules[j]: i + 1 for i, j in enumerate(order)}
    batch_sets = per_batch.top_sets(ranking, eligible, k)
    out: dict[str, Any] = {
        "policy": chosen.policy,
        "walked": chosen.walked,
        "ranking": ranking,
        "note": note,
        "k": k,
        "ops": [m for m in sorted(modules, key=rank.get) if original[modules.index(m)]],
        "matches_ranking": bool((point_top == original).all()),
        "top_same": None,
        "list_jaccard": None,
        "top5": [m for m in sorted(modules, key=rank.get) if top5[modules.index(m)]],
        "top5_same": None,
        "per_batch_same": [bool((s == original).all()) for s in batch_sets],
        "in_doubt": [],
    }
    if boot is None or draws is None:
        return out
    out["top5_same"] = float(draws.share((boot.top_sets(ranking, eligible, n_top) == top5).all(axis=1)))
    if k == 0:  # the policy took nothing from the ranking (the forced ops met the budget): the top 5
        return out
    sets = boot.top_sets(ranking, eligible, k)
    inter = (sets & original).sum(axis=1)
    union = (sets | original).sum(axis=1)
    inside = draws.share(sets)
    doubt = [
        {"module": m, "rank": rank[m], "chosen": bool(original[j]), "share_in_top_k": float(inside[j])}
        for j, m in enumerate(modules)
        if (original[j] and inside[j] < STABLE_SHARE) or (not original[j] and inside[j] > DOUBT_SHARE)
    ]
    out.update(
        top_same=float(draws.share((sets == original).all(axis=1))),
        list_jaccard=draws.mean(inter / union),
        in_doubt=sorted(doubt, key=lambda d: d["rank"]),
    )
    return out


def _verdict(lst: dict[str, Any], batches: int, draws: _Resamples | None) -> tuple[bool | None, str]:
    """Stable or not, in words; exact shares say they are exact (over how many distinct resamples),
    Monte-Carlo ones how many draws they come from."""
    if batches == 1 or draws is None:
        return None, (
            f"{ONE_BATCH}: nothing to resample without new forwards "
            "(raise sensitivity.confidence_batches to measure it)"
        )
    top, top5, k, n5 = lst["top_same"], lst["top5_same"], lst["k"], len(lst["top5"])
    label = f"the top {k} of the {lst['ranking']} ranking"
    exact = draws.exact
    of = (
        f"of the resamples of the {batches} confidence batches (exact: all {len(draws.mult)} distinct "
        "resamples, each weighted by its probability)"
        if exact
        else f"of {draws.total} resamples of the {batches} confidence batches"
    )
    changes_in = "of resamples (exact)" if exact else "of resamples"
    if k == 0:  # no op of the list came from the ranking (the forced ops met the budget): the top 5 alone
        top = 1.0
        if top5 >= STABLE_SHARE:
            return True, (
                f"stable: the keep-list takes no op from the {lst['ranking']} ranking (the forced ops meet "
                f"the budget); its top {n5} is the same set in {_share(top5, exact)} {of}"
            )
    if top >= STABLE_SHARE and top5 >= STABLE_SHARE:
        return True, (
            f"stable: {label} is the same set in {_share(top, exact)} {of}, the top {n5} in "
            f"{_share(top5, exact)}"
        )
    changes = []
    if top < STABLE_SHARE:
        changes.append(f"{label} changes in {_share(1 - top, exact)} {changes_in}")
    if top5 < STABLE_SHARE:
        changes.append(f"the top {n5} change in {_share(1 - top5, exact)} {changes_in}")
    return False, "add calibration samples: " + " and ".join(changes)


def stability(
    report: dict[str, Any],
    inventory: list[OpInfo],
    chosen: ChosenList,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict[str, Any]:
    """The stability document (module docstring), from the report's per-batch values: the
    bootstrap exact when the batches have at most ``resamples`` distinct resamples, else
    ``resamples`` Monte-Carlo draws from ``seed``."""
    scores = phase_scores(report, inventory)
    raw = {p: _raw(report, p) for p in PHASES}
    errors = _batch_errors(report, raw[REQUANT])
    if not (errors > 0).all():
        raise InputError(f"sensitivity report: all-int8 error per batch {errors.tolist()}: scores need > 0")
    n = len(errors)
    point = _Spectrum(raw, errors, np.full((1, n), 1 / n))
    per_batch = _Spectrum(raw, errors, np.eye(n))
    boot = draws = None
    if n > 1:
        exact = distinct_resamples(n) <= resamples
        draws = _Resamples.enumerate(n) if exact else _Resamples.draw(n, resamples, seed)
        boot = _Spectrum(raw, errors, draws.counts / n)
    lst = _list_stability(chosen, point, per_batch, boot, draws)
    stable, verdict = _verdict(lst, n, draws)
    return {
        "schema_version": SCHEMA_VERSION,
        "confidence_batches": n,
        "bootstrap": None if draws is None else EXACT if draws.exact else MONTE_CARLO,
        "resamples": None if draws is None else len(draws.mult),
        "seed": seed if draws is not None and not draws.exact else None,
        "all_int8": {
            "point": all_int8_error(report),
            "per_batch": [float(e) for e in errors],
            "source": all_int8_source(report),
        },
        "phases": {
            p: {"ops": _intervals(scores[p], point.modules, per_batch, boot, draws, p)} for p in PHASES
        },
        "list": lst,
        "stable": stable,
        "verdict": verdict,
    }


def stability_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The headline number for ``dvc metrics`` (the Jaccard and the top 5 stay in stability.json:
    ``dvc metrics show`` must fit 200 columns)."""
    return {"top_same": doc["list"]["top_same"]}


def _fmt_interval(iv: list[float] | None, integer: bool) -> str:
    if iv is None:
        return "-"
    return f"{iv[0]}..{iv[1]}" if integer else f"{iv[0]:.4g}..{iv[1]:.4g}"


def render_section(doc: dict[str, Any], top: int = 10) -> str:
    """The report's "Stability" section (Markdown, starting with ``## ``)."""
    lst, n = doc["list"], doc["confidence_batches"]
    exact = doc["bootstrap"] == EXACT
    if exact:
        how = (
            f"exact: all {doc['resamples']} distinct resamples of the {n} confidence batches with "
            "replacement, each weighted by its probability, so the shares below are exact"
        )
    elif doc["resamples"]:
        how = (
            f"{doc['resamples']} resamples of the {n} confidence batches with replacement, seed {doc['seed']}"
        )
    else:
        how = "no bootstrap: one confidence batch"
    lines = [
        "## Stability",
        "",
        "Would another calibration draw give the same top ops? From the per-batch raw values (no new "
        f"forwards): each confidence batch scored alone, and a bootstrap over the batches ({how}). "
        "Schema and method: `op_sensitivity.report.stability`.",
        "",
        f"**Verdict: {doc['verdict']}.**",
        "",
    ]
    if lst["note"]:
        lines += [f"Note: {lst['note']}.", ""]

    def share(x: float | None) -> str:
        return "n/a" if x is None else _share(x, exact)

    rows = [
        ("keep-list policy", f"{lst['policy']} (walked the {lst['walked']} ranking)"),
        (
            f"chosen top {lst['k']} ({lst['ranking']} ranking)",
            ", ".join(f"`{m}`" for m in lst["ops"]) or "none",
        ),
        ("same top-k set in", share(lst["top_same"])),
        (
            "mean Jaccard with the chosen set",
            "n/a" if lst["list_jaccard"] is None else f"{lst['list_jaccard']:.3f}",
        ),
        (f"same top-{len(lst['top5'])} set in", share(lst["top5_same"])),
        (
            "each batch alone gives the chosen set",
            ", ".join("yes" if s else "no" for s in lst["per_batch_same"]),
        ),
    ]
    if not lst["matches_ranking"]:
        rows.append(("warning", "the list's picked ops are not the top k of this report's ranking"))
    lines += [pd.DataFrame(rows, columns=["", "value"]).to_markdown(index=False), ""]
    if lst["in_doubt"]:
        d = pd.DataFrame(lst["in_doubt"])
        d["share_in_top_k"] = [_share(x, exact) for x in d["share_in_top_k"]]
        lines += [
            "Ops in doubt (chosen but in the top k of < 90 % of resamples, or not chosen but in > 10 %):",
            "",
        ]
        lines += [d[["rank", "module", "chosen", "share_in_top_k"]].to_markdown(index=False), ""]
    for phase in PHASES:
        ops = doc["phases"][phase]["ops"][:top]
        t = pd.DataFrame(
            {
                "rank": [o["rank"] for o in ops],
                "op_name": [o["op_name"] for o in ops],
                "score": [f"{o['score']:.4g}" for o in ops],
                "score per batch": [_fmt_interval(o["batch_interval"]["score"], False) for o in ops],
                "score 5..95 %": [
                    _fmt_interval(o["bootstrap"] and o["bootstrap"]["score"], False) for o in ops
                ],
                "rank per batch": [_fmt_interval(o["batch_interval"]["rank"], True) for o in ops],
                "rank 5..95 %": [_fmt_interval(o["bootstrap"] and o["bootstrap"]["rank"], True) for o in ops],
            }
        )
        lines += [f"### Intervals, phase `{phase}` (top {len(ops)})", "", t.to_markdown(index=False), ""]
    lines += ["![rank intervals](plots/rank_intervals.png)", ""]
    return "\n".join(lines)


def plot_rank_intervals(doc: dict[str, Any], path: Path, top: int = PLOT_TOP) -> None:
    """Per phase, the top ops: point = rank, bar = bootstrap 5..95 %, x = each batch's own rank."""
    fig, axes = plt.subplots(
        1, len(PHASES), figsize=(7 * len(PHASES), max(4, 0.28 * top + 1.5)), squeeze=False
    )
    n_ops = len(doc["phases"][FALLBACK]["ops"])
    for ax, phase in zip(axes[0], PHASES, strict=True):
        ops = doc["phases"][phase]["ops"][:top]
        y = np.arange(len(ops))
        for i, o in enumerate(ops):
            if o["bootstrap"]:
                lo, hi = o["bootstrap"]["rank"]
                ax.hlines(i, lo, hi, color="#1f77b4", linewidth=5, alpha=0.45)
            ranks = o["per_batch"]["rank"]
            ax.scatter(ranks, [i] * len(ranks), marker="x", color="#d62728", s=22, zorder=3)
        ax.scatter([o["rank"] for o in ops], y, marker="o", color="black", s=18, zorder=4)
        ax.set_yticks(y, [o["module"] for o in ops])
        ax.invert_yaxis()
        if n_ops > 50:
            ax.set_xscale("log")
        how = (
            f"bar: bootstrap 5..95 % ({'exact, ' if doc['bootstrap'] == EXACT else ''}"
            f"{doc['resamples']} resamples)"
            if doc["resamples"]
            else "one batch"
        )
        ax.set_title(
            f"{phase}: rank of the top {len(ops)} of {n_ops}\n{how}; x: each batch alone", fontsize=9
        )
        ax.set_xlabel("rank (1 = most sensitive)")
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(
        [
            plt.Line2D([], [], marker="o", color="black", linestyle=""),
            plt.Line2D([], [], color="#1f77b4", alpha=0.45, linewidth=5),
            plt.Line2D([], [], marker="x", color="#d62728", linestyle=""),
        ],
        ["rank (mean of all batches)", "bootstrap 5..95 %", "each batch alone"],
        loc="lower right",
        fontsize=7,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_stability(doc: dict[str, Any], out_dir: Path) -> None:
    """``rank/stability.json``, ``rank/stability_metrics.json`` and ``plots/rank_intervals.png``."""
    plot_rank_intervals(doc, out_dir / "plots" / "rank_intervals.png")
    dump_json(doc, out_dir / "rank" / "stability.json")
    dump_json(stability_metrics(doc), out_dir / "rank" / "stability_metrics.json")
