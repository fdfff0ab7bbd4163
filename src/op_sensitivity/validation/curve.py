"""The ranking curve: what keeping each ranking's top-n ops in high precision buys on held-out captions.

For each ranking (``fallback`` and ``requant`` from the sensitivity report, ``measured``: each
op's own damage when it alone is int8, by the headline metric on the calibration captions) and
each size n, the top-n ops are kept in high precision, every other scored op is int8, and the
metrics are measured on the held-out eval split (``validation.metrics``). No ranking has seen
the eval split. The single-op damage catches what single-op *fallback* misses: two ops that are
each enough to wreck the output (an outlier channel that swamps both up_proj's output and
down_proj's input scales) each look harmless to restore alone.
Random keep-lists of every size (seeded) are the baseline a ranking must beat. n = 0 is the
all-int8 model, n = N (every scored op) the fp32 one.

Artifact ``reports/validation/curve.json`` (stage ``curve``)::

    schema_version: 1
    metric: headline metric (params curve.metric)
    eval: {samples, caption_tokens}
    numerics: {device, dtype, allow_tf32, arithmetic, reduce_range}
    reference: {all_int8: Values, fp32: Values, calibration_all_int8: Values}
                                                  Values: kl, top1, nll, nll_fp32, ppl_ratio, logit_se, tokens
    ops: [module]                                        scored ops, module order
    excluded: [module]                                   kept fp32 by the sensitivity params (cost counted)
    rankings: {fallback | requant | measured: [module]}  most sensitive first
    single_op: {module: {values: Values, damage_share: {metric: share}}}   only this op int8,
                                                  calibration split, share of all-int8's damage
    points: [{ranking, n, kept: [module], cost: {params_kept, params_total, share_params_kept,
              effective_weight_bits}, values: Values, recovered: {metric: share}}]
    random: [{n, lists, cost_mean: {...}, recovered: {metric: {mean, std, min, max}}}]

``recovered`` is the share of the all-int8 damage given back (1 = fp32, 0 = all-int8; None when
all-int8 did no damage by that metric). ``reports/validation/curve.csv`` holds the headline
metric's recovered share per n and ranking, for ``dvc plots``.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..atomic import atomic_file, dump_json, read_json
from ..errors import InputError
from ..inventory import OpInfo, cost
from ..params import CurveParams
from ..phases import MEASURED, METRICS, RANKINGS
from .measure import CALIBRATION, Measurer
from .metrics import damage, recovered

SCHEMA_VERSION = 1


def curve_sizes(n_ops: int, max_points: int | None) -> list[int]:
    """Every n from 0 to ``n_ops``, or at most ``max_points`` of them: 0, 1, N and log-spaced between."""
    if max_points is None or max_points >= n_ops + 1:
        return list(range(n_ops + 1))
    sizes = {0, 1, n_ops}
    steps = max_points - 3
    for i in range(1, steps + 1):
        sizes.add(round(math.exp(math.log(n_ops) * i / (steps + 1))))
    return sorted(sizes)


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
    """Every ranking's top-n points, the random baseline and each op's own gain; see the module doc."""
    ops = measurer.scored

    def cost_of(keep) -> dict[str, Any]:
        return cost(set(keep) | excluded, inventory)

    sizes = curve_sizes(len(ops), params.max_points)
    inner = [n for n in sizes if 0 < n < len(ops)]
    total = 3 + len(ops) + len(sizes) * (len(rankings) + 1) + len(inner) * params.random_lists
    bar = tqdm(total=total, desc="curve: configurations measured", leave=False)
    all_int8, fp32 = measurer.measure([]), measurer.measure(ops)
    cal_int8 = measurer.measure([], CALIBRATION)
    bar.update(3)
    single = {}
    for m in ops:
        values = measurer.measure([o for o in ops if o != m], CALIBRATION)
        single[m] = {"values": values, "damage_share": damage_share(values, cal_int8)}
        bar.update()
    share = {m: single[m]["damage_share"][params.metric] or 0.0 for m in ops}
    order = {**rankings, MEASURED: sorted(ops, key=lambda m: (-share[m], ops.index(m)))}
    points = []
    for name in RANKINGS:
        for n in sizes:
            keep = order[name][:n]
            values = measurer.measure(keep)
            points.append(
                {
                    "ranking": name,
                    "n": n,
                    "kept": keep,
                    "cost": cost_of(keep),
                    "values": values,
                    "recovered": recovered(values, all_int8),
                }
            )
            bar.update()
    baseline = []
    for n in inner:
        baseline.append(random_baseline(measurer, ops, n, params, all_int8, cost_of))
        bar.update(params.random_lists)
    bar.close()
    return {
        "schema_version": SCHEMA_VERSION,
        "metric": params.metric,
        "eval": {"samples": measurer.samples(), "caption_tokens": all_int8["tokens"]},
        "numerics": {**measurer.numerics.details(), "reduce_range": measurer.numerics.reduce_range},
        "reference": {"all_int8": all_int8, "fp32": fp32, "calibration_all_int8": cal_int8},
        "ops": ops,
        "excluded": sorted(excluded),
        "rankings": order,
        "single_op": single,
        "points": points,
        "random": baseline,
    }


def damage_share(values: dict[str, float], all_int8: dict[str, float]) -> dict[str, float | None]:
    """Per metric, the share of the all-int8 damage these values carry (None if int8 did no damage)."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        worst = damage(all_int8, metric)
        out[metric] = damage(values, metric) / worst if worst > 0 else None
    return out


def curve_table(doc: dict[str, Any]) -> pd.DataFrame:
    """The headline metric's recovered share per n: one column per ranking, the random mean and spread."""
    metric = doc["metric"]
    table = pd.DataFrame({"n": sorted({p["n"] for p in doc["points"]})}).set_index("n")
    for name in RANKINGS:
        pts = {p["n"]: p["recovered"][metric] for p in doc["points"] if p["ranking"] == name}
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
    ok = ok and isinstance(doc.get("single_op"), dict) and set(doc["single_op"]) == set(doc["ops"])
    ok = ok and all(
        isinstance(p, dict) and {"ranking", "n", "kept", "cost", "values", "recovered"} <= set(p)
        for p in doc["points"]
    )
    if not ok:
        raise InputError(
            f"{path}: not a ranking curve of schema_version {SCHEMA_VERSION} (expected ops, rankings "
            f"{'/'.join(RANKINGS)}, single_op, points and random)"
        )
    return doc
