"""The ranking curve: what keeping each ranking's top-n ops in high precision buys on the selection split.

For each ranking (``fallback`` and ``requant`` from the sensitivity report, ``measured``: each
op's own damage when it alone is int8, by the headline metric on the calibration captions) and
each size n, the top-n ops are kept in high precision, every other scored op is int8, and the
metrics are measured on the held-out selection split (``validation.metrics``). No ranking has
seen the selection split; the measured keep-list policies choose from these numbers, so
``validate`` proves the chosen list on a third split, ``test``, and finds the same crossings
there (``validation.validate``, with :func:`bisect_crossing`). The single-op damage catches
what single-op *fallback* misses: two ops that are each enough to wreck the output (an outlier
channel that swamps both up_proj's output and down_proj's input scales) each look harmless to
restore alone.
Random keep-lists of every size (seeded) are the baseline a ranking must beat. n = 0 is the
all-int8 model, n = N (every scored op) the fp32 one.

Cost, and how it is bounded (``curve.max_points`` / ``curve.single_op``, both ``auto`` by
default). Measuring every n for three rankings, R random lists per n and one single-op
configuration per op is about (4 + R) x N forwards: 3,750 forwards of the full model for the
3B's 417 ops. So once N passes :data:`DENSE_MAX`:

* the sizes are every n up to :data:`DENSE_HEAD` (the top ops decide most keep-lists), then
  :data:`PER_OCTAVE` log-spaced sizes per doubling, then N (:func:`curve_sizes`), and the random
  lists are measured at those sizes only;
* each crossing (``curve.crossings``: 50, 90 and 99 % of the all-int8 damage given back, by
  the headline metric, on every ranking) is then bisected between the two grid sizes that
  bracket it, so the n the report and a ``measured_budget`` policy read is the one every-n
  measurement would give wherever the curve rises monotonically between those two sizes;
* single-op damage is measured for a pool: the top :data:`DENSE_MAX` ops of the fallback and
  of the requant ranking (their union). The ``measured`` ranking orders the pool by measured
  damage, as before; the ops outside it follow, in fallback order, and ``single_op_pool``
  says so. An op the pass ranks outside both top lists would have to beat the pool's ops
  alone while neither phase of the pass noticed it.

:func:`curve_cost` gives the count for any N (docs/artifacts.md has it as a table).

Artifact ``reports/validation/curve.json`` (stage ``curve``)::

    schema_version: 3
    metric: headline metric (params curve.metric)
    selection: {samples, caption_tokens}         the held-out split measured (data/selection)
    numerics: {device, dtype, allow_tf32, arithmetic, reduce_range}
    reference: {all_int8: Values, fp32: Values, calibration_all_int8: Values}
                                                  Values: kl, top1, nll, nll_fp32, ppl_ratio, logit_se, tokens
    ops: [module]                                        scored ops, module order
    excluded: [module]                                   kept fp32 by the sensitivity params (cost counted)
    rankings: {fallback | requant | measured: [module]}  most sensitive first
    single_op: {module: {values: Values, damage_share: {metric: share}}}   only this op int8,
                                                  calibration split, share of all-int8's damage
                                                  (the pool's ops: single_op_pool)
    single_op_pool: {rule: str, ops: int}         which ops were measured alone
    sizes: [n]                                    the grid (every ranking, random lists, curve.csv)
    targets: [{ranking, metric, share, n, within}]   the crossings (curve.crossings, headline
                                                  metric): the smallest n reaching the share (bisected
                                                  on a log-spaced grid until bracketed within
                                                  curve.crossing_tolerance of n: ``within`` ops, 1 =
                                                  exact, else n is at most within - 1 above it);
                                                  null if none does
    points: [{ranking, n, kept: [module], cost: {params_kept, params_total, share_params_kept,
              effective_weight_bits, kept_weight_bits}, values: Values, recovered: {metric: share}}]
                                                  the grid's sizes and the bisection's, per ranking
    random: [{n, lists, cost_mean: {...}, recovered: {metric: {mean, std, min, max}}}]

``recovered`` is the share of the all-int8 damage given back (1 = fp32, 0 = all-int8; None when
all-int8 did no damage by that metric). ``reports/validation/curve.csv`` holds the headline
metric's recovered share per size of the grid (``sizes``) and ranking, for ``dvc plots``.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from .. import logs
from ..atomic import atomic_file, dump_json, read_json
from ..errors import InputError
from ..inventory import OpInfo, cost
from ..params import CurveParams
from ..phases import FALLBACK, MEASURED, METRICS, RANKINGS
from .measure import CALIBRATION, Measurer
from .metrics import damage, recovered

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
DENSE_MAX = 32  # up to this many scored ops every size is measured and every op alone
DENSE_HEAD = 8  # a log-spaced grid still has every n up to this
PER_OCTAVE = 3  # then this many sizes per doubling of n

Target = tuple[str, str, float]  # (ranking, metric, share of the all-int8 damage given back)


def curve_sizes(n_ops: int, max_points: int | str | None = "auto") -> list[int]:
    """The sizes n measured for every ranking: see the module doc.

    ``auto``: every n while ``n_ops <= DENSE_MAX``; else every n up to ``DENSE_HEAD``, then
    ``round(DENSE_HEAD * 2 ** (k / PER_OCTAVE))`` for k = 1, 2, ... below ``n_ops``, then
    ``n_ops``. None: every n. An integer: at most that many, 0, 1, N and log-spaced between.
    """
    if max_points is None or (max_points == "auto" and n_ops <= DENSE_MAX):
        return list(range(n_ops + 1))
    if max_points == "auto":
        sizes = set(range(min(DENSE_HEAD, n_ops) + 1)) | {n_ops}
        k = 1
        while (n := round(DENSE_HEAD * 2 ** (k / PER_OCTAVE))) < n_ops:
            sizes.add(n)
            k += 1
        return sorted(sizes)
    if max_points >= n_ops + 1:
        return list(range(n_ops + 1))
    sizes = {0, 1, n_ops}
    steps = max_points - 3
    for i in range(1, steps + 1):
        sizes.add(round(math.exp(math.log(n_ops) * i / (steps + 1))))
    return sorted(sizes)


def single_op_pool(
    ops: list[str], rankings: dict[str, list[str]], setting: int | str = "auto"
) -> tuple[list[str], str]:
    """The ops measured alone (module order) and the rule that chose them, in words."""
    if setting == "all" or (setting == "auto" and len(ops) <= DENSE_MAX):
        return list(ops), "every scored op"
    k = DENSE_MAX if setting == "auto" else int(setting)
    pool = {m for name in sorted(rankings) for m in rankings[name][:k]}
    if len(pool) >= len(ops):
        return list(ops), "every scored op"
    names = " and ".join(sorted(rankings))
    return [m for m in ops if m in pool], f"the top {k} of the {names} rankings ({len(pool)} ops)"


def widest_gap(sizes: list[int]) -> tuple[int, int]:
    """The grid's widest gap (its two sizes): where one bisection costs the most configurations."""
    return max(zip(sizes, sizes[1:], strict=False), key=lambda g: g[1] - g[0], default=(0, 1))


def bisection_stop(n: int, tolerance: float) -> int:
    """The bracket a bisection whose upper end is ``n`` may stop at: ``curve.crossing_tolerance``
    of ``n``, at least 1 op (exact)."""
    return max(1, math.ceil(tolerance * n))


def refinement_steps(sizes: list[int], tolerance: float = 0.0) -> int:
    """Most extra configurations one bisection costs on this grid: the most over its gaps (each step
    leaves at most half the gap, rounded up; a bracket's upper end stays above the gap's lower one)."""
    steps = 0
    for lo, hi in zip(sizes, sizes[1:], strict=False):
        stop = bisection_stop(lo + 1, tolerance)
        if hi - lo > stop:
            steps = max(steps, math.ceil(math.log2((hi - lo) / stop)))
    return steps


def curve_cost(n_ops: int, params: CurveParams) -> dict[str, int]:
    """Configurations the curve stage measures for ``n_ops`` scored ops (each is one forward over a
    split: selection for points and random lists, calibration for single-op damage). The bisections'
    cost is an upper bound (``refinement_max``: every crossing in the grid's widest gap)."""
    sizes = curve_sizes(n_ops, params.max_points)
    inner = len([n for n in sizes if 0 < n < n_ops])
    pool = (
        n_ops
        if params.single_op == "all" or (params.single_op == "auto" and n_ops <= DENSE_MAX)
        else min(n_ops, 2 * (DENSE_MAX if params.single_op == "auto" else int(params.single_op)))
    )
    cost = {
        "sizes": len(sizes),
        "references": 3,
        "single_op_max": pool,
        "ranking_points": len(RANKINGS) * inner,
        "random_lists": params.random_lists * inner,
        "refinement_max": len(curve_targets(params)) * refinement_steps(sizes, params.crossing_tolerance),
    }
    cost["total_max"] = sum(v for k, v in cost.items() if k != "sizes")
    return cost


def curve_targets(params: CurveParams) -> list[Target]:
    """The crossings to bisect: every share of ``curve.crossings`` on every ranking, headline metric."""
    return [(name, params.metric, share) for share in params.crossings for name in RANKINGS]


def random_lists(ops: list[str], n: int, count: int, seed: int) -> list[list[str]]:
    """``count`` keep-lists of ``n`` ops, the same for the same seed and size."""
    rng = random.Random(f"{seed}-{n}")
    return [sorted(rng.sample(ops, n), key=ops.index) for _ in range(count)]


def _stats(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.pstdev(vals),
        "min": min(vals),
        "max": max(vals),
    }


def random_baseline(
    measurer: Measurer, ops: list[str], n: int, params: CurveParams, all_int8: dict, cost_of
) -> dict[str, Any]:
    """Measured damage of ``params.random_lists`` random lists of size ``n``: mean and spread per metric."""
    lists = random_lists(ops, n, params.random_lists, params.seed)
    shares = [recovered(measurer.measure(keep), all_int8) for keep in lists]
    costs = [cost_of(keep) for keep in lists]
    return {
        "n": n,
        "lists": len(lists),
        "cost_mean": {k: statistics.fmean(c[k] for c in costs) for k in costs[0]},
        "recovered": {m: _stats([s[m] for s in shares]) for m in METRICS},
    }


def measure_curve(
    measurer: Measurer,
    rankings: dict[str, list[str]],
    excluded: set[str],
    inventory: list[OpInfo],
    params: CurveParams,
) -> dict[str, Any]:
    """Every ranking's top-n points, the random baseline and the pool's own gains; see the module doc."""
    ops = measurer.scored
    targets = curve_targets(params)

    def cost_of(keep) -> dict[str, Any]:
        return cost(set(keep) | excluded, inventory)

    sizes = curve_sizes(len(ops), params.max_points)
    inner = [n for n in sizes if 0 < n < len(ops)]
    pool, rule = single_op_pool(ops, rankings, params.single_op)
    budget = curve_cost(len(ops), params)
    bar = tqdm(
        total=budget["total_max"],
        desc="curve: configurations measured",
        leave=False,
        file=logs.terminal_err(),
    )
    log.info(
        "curve: %d ops, %d sizes, single-op damage of %s; at most %d configurations",
        len(ops),
        len(sizes),
        rule,
        budget["total_max"],
    )
    all_int8, fp32 = measurer.measure([]), measurer.measure(ops)
    cal_int8 = measurer.measure([], CALIBRATION)
    bar.update(3)
    single = {}
    for m in pool:
        values = measurer.measure([o for o in ops if o != m], CALIBRATION)
        single[m] = {"values": values, "damage_share": damage_share(values, cal_int8)}
        bar.update()
    share = {m: single[m]["damage_share"][params.metric] or 0.0 for m in pool}
    first = sorted(pool, key=lambda m: (-share[m], ops.index(m)))
    rest = [m for m in rankings[FALLBACK] if m not in share]
    order = {**rankings, MEASURED: first + rest}
    known = {0: all_int8, len(ops): fp32}  # no choice at either end: the reference forwards
    points: dict[tuple[str, int], dict[str, Any]] = {}

    def point(name: str, n: int) -> dict[str, Any]:
        if (name, n) not in points:
            keep = order[name][:n]
            values = known[n] if n in known else measurer.measure(keep)
            bar.update(n not in known)
            points[name, n] = {
                "ranking": name,
                "n": n,
                "kept": keep,
                "cost": cost_of(keep),
                "values": values,
                "recovered": recovered(values, all_int8),
            }
        return points[name, n]

    for name in RANKINGS:
        for n in sizes:
            point(name, n)
    crossings = []
    for r, m, s in targets:
        n = bisect_crossing(point, r, m, s, sizes, params.crossing_tolerance)
        within = None if n is None else bisection_stop(n, params.crossing_tolerance)
        crossings.append({"ranking": r, "metric": m, "share": s, "n": n, "within": within})
    baseline = []
    for n in inner:
        baseline.append(random_baseline(measurer, ops, n, params, all_int8, cost_of))
        bar.update(params.random_lists)
    bar.close()
    return {
        "schema_version": SCHEMA_VERSION,
        "metric": params.metric,
        "selection": {"samples": measurer.samples(), "caption_tokens": all_int8["tokens"]},
        "numerics": {**measurer.numerics.details(), "reduce_range": measurer.numerics.reduce_range},
        "reference": {"all_int8": all_int8, "fp32": fp32, "calibration_all_int8": cal_int8},
        "ops": ops,
        "excluded": sorted(excluded),
        "rankings": order,
        "single_op": single,
        "single_op_pool": {"rule": rule, "ops": len(pool)},
        "sizes": sizes,
        "targets": crossings,
        "points": [points[k] for k in sorted(points, key=lambda k: (RANKINGS.index(k[0]), k[1]))],
        "random": baseline,
    }


def _reaches(p: dict[str, Any], metric: str, share: float) -> bool:
    got = p["recovered"][metric]
    return got is None or got >= share - 1e-12  # None: all-int8 did no damage, nothing to give back


def bisect_crossing(
    point, ranking: str, metric: str, share: float, sizes: list[int], tolerance: float = 0.0
) -> int | None:
    """The smallest n reaching ``share`` on the grid, then bisected down inside its grid gap until
    the bracket is within ``tolerance`` of its upper end (:func:`bisection_stop`; 0: exact); the
    bracket's upper end, a size that reaches it and at most ``bisection_stop(n) - 1`` above the
    smallest that does (where the curve rises monotonically in the gap).

    ``point(ranking, n)`` is called lazily (a dict with ``recovered: {metric: share}``), from the
    grid's small end: only the sizes up to the first that reaches the share, then the bisection's."""
    hi = next((n for n in sizes if _reaches(point(ranking, n), metric, share)), None)
    if hi is None:
        return None
    lo = max((n for n in sizes if n < hi), default=None)
    if lo is None:
        return hi
    while hi - lo > bisection_stop(hi, tolerance):  # invariant: lo misses the share, hi reaches it
        mid = (lo + hi) // 2
        if _reaches(point(ranking, mid), metric, share):
            hi = mid
        else:
            lo = mid
    return hi


def damage_share(values: dict[str, float], all_int8: dict[str, float]) -> dict[str, float | None]:
    """Per metric, the share of the all-int8 damage these values carry (None if int8 did no damage)."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        worst = damage(all_int8, metric)
        out[metric] = damage(values, metric) / worst if worst > 0 else None
    return out


def curve_table(doc: dict[str, Any]) -> pd.DataFrame:
    """The headline metric's recovered share per grid size: one column per ranking, the random
    mean and spread (the bisection's extra sizes have no random lists; they stay in curve.json)."""
    metric = doc["metric"]
    grid = set(doc["sizes"])
    table = pd.DataFrame({"n": doc["sizes"]}).set_index("n")
    for name in RANKINGS:
        pts = {
            p["n"]: p["recovered"][metric] for p in doc["points"] if p["ranking"] == name and p["n"] in grid
        }
        table[f"{name}_{metric}_recovered"] = pd.Series(pts)
    ends = [table.index.min(), table.index.max()]  # 0 ops kept and every op: no choice, no randomness
    for key in ("mean", "min", "max"):
        pts = {r["n"]: r["recovered"][metric][key] for r in doc["random"]}
        pts.update({n: table.loc[n, f"{RANKINGS[0]}_{metric}_recovered"] for n in ends})
        table[f"random_{metric}_recovered_{key}"] = pd.Series(pts)
    return table.reset_index()


def write_curve(doc: dict[str, Any], path: Path, csv_path: Path) -> None:
    dump_json(doc, path)
    with atomic_file(csv_path) as tmp:
        curve_table(doc).to_csv(tmp, index=False, float_format="%.6g")


def read_curve(path: Path) -> dict[str, Any]:
    """Read ``curve.json`` back, checking what the measured policies and the report read."""
    doc = read_json(path, "ranking curve", "curve")
    ok = isinstance(doc, dict) and doc.get("schema_version") == SCHEMA_VERSION
    ok = ok and all(isinstance(doc.get(k), list) for k in ("ops", "points", "random"))
    ok = ok and isinstance(doc.get("rankings"), dict) and set(doc["rankings"]) == set(RANKINGS)
    ok = ok and isinstance(doc.get("single_op"), dict) and set(doc["single_op"]) <= set(doc["ops"])
    ok = ok and isinstance(doc.get("sizes"), list) and isinstance(doc.get("targets"), list)
    ok = ok and isinstance(doc.get("selection"), dict)
    ok = ok and all(
        isinstance(p, dict) and {"ranking", "n", "kept", "cost", "values", "recovered"} <= set(p)
        for p in doc["points"]
    )
    if not ok:
        raise InputError(
            f"{path}: not a ranking curve of schema_version {SCHEMA_VERSION} (expected selection, ops, "
            f"rankings {'/'.join(RANKINGS)}, single_op, sizes, targets, points and random; rerun the curve "
            "stage)"
        )
    return doc
