"""The chosen keep-list, measured: on the test split, against random lists of its size, and
against INC's own PTQ run from the exported ``op_name_dict``; and the ops each ranking needs there.

Three disjoint splits (``data.calibration``): the sensitivity pass and the observers use the
calibration sample, the curve stage and the measured keep-list policies the selection split, and
this stage only the test split, so the list is proven on images neither the calibration nor the
choice used. Every number below, the all-int8 and fp32 references included, is measured here on
the test split; nothing is taken from ``curve.json`` but the rankings' orders and its grid of sizes.

Artifact ``reports/validation/validation.json`` (stage ``validate``; its headline numbers, in
``metrics.json``, are DVC metrics: :func:`metrics`)::

    keep_list: {ops, ops_scored, params_kept, params_total, share_params_kept, effective_weight_bits,
                kept_weight_bits}   (inventory.cost: kept ops at their stored dtype's bits)
    metric: headline metric
    test: {samples, caption_tokens}          the split measured (data/test)
    chosen: {values: Values, recovered: {metric: share},
             recovered_interval: {metric: {low, high, level: 0.95, resamples, images, seed} | null}}
                           how far to trust recovered: the 95 % percentile bootstrap interval of the
                           share over the test split's images (validation.interval: 2000 seeded
                           resamples of the images with replacement, per-image sums of the same
                           measurement, so values and recovered are unchanged to the bit; resamples:
                           those where all-int8 did damage); null where recovered is or with fewer
                           than 2 images
    random: {n, lists, cost_mean, recovered: {metric: {mean, std, min, max}}} | null (n = 0 or all)
    beats_random: {metric: bool | null}      chosen recovered > the best random list of its size
    reference: {all_int8: Values, fp32: Values}
    inc_ptq: {values: Values, native_prediction: Values, abs_diff: {metric: float},
              rel_diff: {metric: float | null},
              compared: {model: whole | carved, model_sha256, params, whole_max_params,
                         carved only: source_params, decoder_layers, of_decoder_layers,
                         vision_blocks, of_vision_blocks, vocab, of_vocab, keep_list_ops,
                         int8_ops}}
             | null        (params validate.inc_check; validation.inc_check)
    inc_ptq_note: str      only when a carved copy has no op int8 under the list (nothing to check)
    rankings: {fallback | requant | measured | random: {"<share>": n | null}}
                           per share of curve.crossings (keys as "0.5", "0.9", "0.99"), the smallest
                           n of the ranking's top ops (its order in curve.json) giving back at least
                           that share of the all-int8 damage in the headline metric, on the test
                           split; random: the mean over curve.random_lists seeded random lists of
                           each size. Found on curve.json's grid of sizes, then bisected inside the
                           grid gap (``curve.bisect_crossing``: exact where the curve rises
                           monotonically in that gap, or within ``rankings_tolerance`` of it);
                           null if no size reaches it (ranking_crossings)
    rankings_tolerance: float   curve.crossing_tolerance: 0 = exact; else each n is at most
                           ``curve.bisection_stop(n, tolerance) - 1`` above the smallest

The rankings' numbers are also written one small file per row, ``reports/rankings/
<ranking>.json`` = ``{"n50": n, "n90": n, "n99": n}`` (:func:`rankings_metrics`; the same keys in
every file, so ``dvc metrics show`` puts them in as many columns).

Values and recovered shares as in ``validation.metrics``. The same numbers, in words, are the
"Validation" section of ``op_sensitivity.md`` (:func:`section`), and ``pareto.png`` draws the
chosen list on the ranking curves.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..inventory import OpInfo, cost
from ..params import CurveParams
from ..phases import FALLBACK, MEASURED, METRICS, RANKINGS, REQUANT
from .curve import (
    bisect_crossing,
    curve_sizes,
    random_baseline,
    random_lists,
    refinement_steps,
)
from .interval import bootstrap_recovered, per_image
from .measure import Measurer
from .metrics import SampleSums, damage, recovered

METRIC_NAMES = {
    "kl": "KL(fp32 || quantized) per caption token",
    "top1": "top-1 agreement with fp32",
    "nll": "caption NLL",
    "logit_se": "logit squared error (INC's measure)",
}
RANDOM = "random"
ROWS = (*RANKINGS, RANDOM)  # the rankings table's rows, as keys of validation.json's rankings
ROW_NAMES = {FALLBACK: "INC fallback", REQUANT: "INC requant", MEASURED: "measured", RANDOM: "random"}


def validate_keep_list(
    measurer: Measurer,
    keep: list[str],
    excluded: set[str],
    inventory: list[OpInfo],
    params: CurveParams,
    curve: dict[str, Any],
) -> dict[str, Any]:
    """Measure ``keep`` and ``params.random_lists`` random lists of its size on the measurer's
    held-out split (validate: the test split), and each ranking of ``curve`` there
    (:func:`ranking_crossings`)."""
    ops = measurer.scored
    unknown = sorted(set(keep) - set(ops))
    if unknown:
        raise ValueError(f"keep-list ops the sensitivity pass did not score: {unknown[:5]}")
    int8_sums = measurer.measure_totals([], per_sample=True)
    all_int8, fp32 = int8_sums.values(), measurer.measure(ops)
    kept_sums = measurer.measure_totals(keep, per_sample=True)
    values = kept_sums.values()
    chosen = {"values": values, "recovered": recovered(values, all_int8)}
    chosen["recovered_interval"] = recovered_intervals(
        chosen["recovered"], kept_sums.per_sample, int8_sums.per_sample, measurer.images()
    )
    baseline = None
    if 0 < len(keep) < len(ops):
        baseline = random_baseline(
            measurer, ops, len(keep), params, all_int8, lambda k: cost(set(k) | excluded, inventory)
        )
    beats = {
        m: (
            None
            if baseline is None or chosen["recovered"][m] is None
            else chosen["recovered"][m] > baseline["recovered"][m]["max"]
        )
        for m in METRICS
    }
    return {
        "keep_list": {"ops": len(keep), "ops_scored": len(ops), **cost(set(keep) | excluded, inventory)},
        "metric": params.metric,
        "test": {"samples": measurer.samples(), "caption_tokens": all_int8["tokens"]},
        "chosen": chosen,
        "random": baseline,
        "beats_random": beats,
        "reference": {"all_int8": all_int8, "fp32": fp32},
        "inc_ptq": None,
        "rankings": ranking_crossings(measurer, curve, params, all_int8, fp32),
        "rankings_tolerance": params.crossing_tolerance,
    }


def recovered_intervals(
    shares: dict[str, float | None], kept: SampleSums, all_int8: SampleSums, images: list[int]
) -> dict[str, dict[str, Any] | None]:
    """Per metric, the bootstrap interval of the recovered share over the split's images
    (``validation.interval``): one number over a few images needs its spread beside it. Null where
    the share is (all-int8 did no damage: nothing to bound)."""
    return {
        m: None
        if shares[m] is None
        else bootstrap_recovered(per_image(kept.damage(m), images), per_image(all_int8.damage(m), images))
        for m in METRICS
    }


def validate_cost(n_ops: int, params: CurveParams) -> dict[str, int]:
    """Configurations validate measures on the test split for ``n_ops`` scored ops: the list's
    (references, the list, its random lists) and, at most, the rankings' crossings (every inner
    size of the curve's grid, then each crossing's bisection in the grid's widest gap, for each
    ranking and each random list)."""
    sizes = curve_sizes(n_ops, params.max_points)
    inner = len([n for n in sizes if 0 < n < n_ops])
    per_row = inner + len(params.crossings) * refinement_steps(sizes, params.crossing_tolerance)
    rows = len(RANKINGS) + params.random_lists
    cost = {"keep_list": 3 + params.random_lists, "rankings_max": rows * per_row}
    cost["total_max"] = cost["keep_list"] + cost["rankings_max"]
    return cost


def share_key(share: float) -> str:
    """A share of ``curve.crossings`` as a key of validation.json's rankings: 0.9 -> "0.9"."""
    return f"{share:g}"


def ranking_crossings(
    measurer: Measurer,
    curve: dict[str, Any],
    params: CurveParams,
    all_int8: dict[str, float],
    fp32: dict[str, float],
) -> dict[str, dict[str, int | None]]:
    """Per ranking of ``curve`` (its orders) and for the random lists, per share of
    ``params.crossings``: the smallest n of top ops giving back that share of the all-int8 damage
    in ``params.metric``, on the measurer's held-out split; see the module doc.

    ``all_int8`` and ``fp32``: the measurer's references (n = 0 and n = N, no choice at either end).
    """
    ops = measurer.scored
    if list(curve["ops"]) != list(ops):
        raise ValueError("the curve's ops are not the measurer's scored ops")
    metric, sizes = params.metric, list(curve["sizes"])
    known = {0: all_int8, len(ops): fp32}
    points: dict[tuple[str, int], dict[str, Any]] = {}

    def point(name: str, n: int) -> dict[str, Any]:
        if (name, n) not in points:
            if n in known:
                shares = [recovered(known[n], all_int8)[metric]]
            elif name == RANDOM:
                lists = random_lists(ops, n, params.random_lists, params.seed)
                shares = [recovered(measurer.measure(keep), all_int8)[metric] for keep in lists]
            else:
                shares = [recovered(measurer.measure(curve["rankings"][name][:n]), all_int8)[metric]]
            got = [x for x in shares if x is not None]
            points[name, n] = {"recovered": {metric: statistics.fmean(got) if got else None}}
        return points[name, n]

    tolerance = params.crossing_tolerance
    return {
        name: {
            share_key(s): bisect_crossing(point, name, metric, s, sizes, tolerance) for s in params.crossings
        }
        for name in ROWS
    }


def rankings_metrics(doc: dict[str, Any], crossings: tuple[float, ...]) -> dict[str, dict[str, int | None]]:
    """One DVC metrics file per row of the rankings table: ``{ranking: {"n50": n, "n90": n, ...}}``."""
    return {name: {f"n{100 * s:g}": doc["rankings"][name][share_key(s)] for s in crossings} for name in ROWS}


def compare_with_inc(
    doc: dict[str, Any], inc: dict[str, float], native: dict[str, float], compared: dict[str, Any]
) -> dict[str, Any]:
    """INC's real quantized model against the native prediction it should equal (``validation.inc_check``
    measures both, on the whole model or a carved copy: ``compared``)."""
    abs_diff = {m: abs(damage(inc, m) - damage(native, m)) for m in METRICS}
    rel = {m: (abs_diff[m] / abs(damage(native, m)) if damage(native, m) else None) for m in METRICS}
    doc["inc_ptq"] = {
        "values": inc,
        "native_prediction": native,
        "abs_diff": abs_diff,
        "rel_diff": rel,
        "compared": compared,
    }
    return doc


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def interval_words(doc: dict[str, Any]) -> str:
    """The headline share's interval, in words for the section (empty where there is no share)."""
    m = doc["metric"]
    if doc["chosen"]["recovered"][m] is None:
        return ""
    ci = doc["chosen"]["recovered_interval"][m]
    if ci is None:
        return " (no interval: fewer than 2 test images, or none of their resamples took int8 damage)"
    return (
        f" ({100 * ci['level']:g} % interval over the {ci['images']} test images, a seeded bootstrap of "
        f"{ci['resamples']} resamples: {_pct(ci['low'])} to {_pct(ci['high'])})"
    )


def section(
    doc: dict[str, Any],
    curve: dict[str, Any],
    widened: list[dict[str, Any]] | None = None,
    chosen_by: str | None = None,
) -> str:
    """The "Validation" section of ``op_sensitivity.md``: what the list buys, in plain words.

    ``widened``: the keep-list's ``groups_widened`` (fused groups kept whole for the runtimes);
    ``chosen_by``: its policy's reason (which ranking it walked and why, what it measured).
    """
    m = doc["metric"]
    k = doc["keep_list"]
    rec = doc["chosen"]["recovered"][m]
    t = doc["test"]
    lines = [
        "## Validation on held-out captions",
        "",
        f"Every number of this section is measured on the test split, images neither the calibration nor "
        f"the choice used: {t['samples']} image+caption pairs, {t['caption_tokens']} caption tokens, "
        f"teacher-forced (the keep-list was chosen from the ranking curves of the selection split, "
        f"{curve['selection']['samples']} pairs of other images). Headline metric: {METRIC_NAMES[m]}.",
        "",
        f"The keep-list ({k['ops']} of {k['ops_scored']} ops, {100 * k['share_params_kept']:.2f} % of the "
        f"weight parameters, {k['effective_weight_bits']:.3g} effective weight bits) gives back "
        f"{_pct(rec)} of the all-int8 damage{interval_words(doc)}.",
        "",
    ]
    if chosen_by:
        lines += [f"How it was chosen (on the selection split): {chosen_by}.", ""]
    for g in widened or []:
        lines += [
            f"Fused group `{g['group']}` kept whole (vLLM / SGLang / TensorRT-LLM load it as one layer): "
            f"added {', '.join(f'`{m}`' for m in g['added'])}, {g['params_added']:,} params.",
            "",
        ]
    if doc["random"] is not None:
        r = doc["random"]["recovered"][m]
        verdict = doc["beats_random"][m]
        lines += [
            f"{doc['random']['lists']} random lists of the same size give back {_pct(r['mean'])} on average "
            f"(from {_pct(r['min'])} to {_pct(r['max'])}).",
            "",
            (
                "The list does better than every random list of its size."
                if verdict
                else "**The list is no better than a random list of its size**: the ranking does not find "
                "the ops that matter on this data."
                if verdict is False
                else "All-int8 did no damage by this metric: nothing to give back."
            ),
            "",
        ]
    rows = ["| metric | fp32 | all-int8 | keep-list | recovered | random mean |", "|---|---|---|---|---|---|"]
    for metric in METRICS:
        ref = doc["reference"]
        mean = doc["random"]["recovered"][metric]["mean"] if doc["random"] else None
        chosen = doc["chosen"]
        rows.append(
            f"| {metric} | {ref['fp32'][metric]:.6g} | {ref['all_int8'][metric]:.6g} | "
            f"{chosen['values'][metric]:.6g} | {_pct(chosen['recovered'][metric])} | {_pct(mean)} |"
        )
    lines += rows + [""]
    lines += rankings_table(doc["rankings"], m) + [""]
    if doc["inc_ptq"] is not None:
        d = doc["inc_ptq"]
        c = d["compared"]
        where = (
            "the whole model"
            if c["model"] == "whole"
            else f"a copy carved from the model's weights (the first {c['decoder_layers']} of "
            f"{c['of_decoder_layers']} decoder layers, {c['vision_blocks']} of {c['of_vision_blocks']} "
            f"vision blocks and the {c['vocab']:,} vocabulary rows the captions use, {c['params']:,} of "
            f"{c['source_params']:,} parameters, as the crosscheck: above crosscheck.whole_max_params "
            "INC's PTQ of the whole model does not fit a 24 GB machine), with the keep-list's ops it "
            f"has ({len(c['keep_list_ops'])}) and the ops the pass kept fp32 in high precision and "
            f"{c['int8_ops']} ops int8"
        )
        lines += [
            "INC's own PTQ (`quantization.fit` with the exported `op_name_dict`, calibrated on the same "
            f"sample) against the native prediction for the same list, on {where}: {m} "
            f"{d['values'][m]:.6g} vs {d['native_prediction'][m]:.6g} (relative difference "
            f"{_pct(d['rel_diff'][m])}); logit squared error {d['values']['logit_se']:.6g} vs "
            f"{d['native_prediction']['logit_se']:.6g}.",
            "",
        ]
    elif doc.get("inc_ptq_note"):
        lines += [doc["inc_ptq_note"] + ".", ""]
    return "\n".join(lines)


def rankings_table(rankings: dict[str, dict[str, int | None]], metric: str) -> list[str]:
    """The Markdown table of the rankings' crossings on the test split (validation.json's ``rankings``)."""
    shares = list(rankings[RANDOM])
    head = " / ".join(f"{100 * float(s):g}" for s in shares)
    lines = [
        f"Ops needed to give back {head} % of the all-int8 {metric} damage, test split (each ranking's top "
        "ops in the order the curve stage recorded; random: the mean of the seeded random lists of each "
        "size; - where no size does):",
        "",
        "| ranking | " + " | ".join(f"{100 * float(s):g} %" for s in shares) + " |",
        "|---|" + "---|" * len(shares),
    ]
    for name in ROWS:
        cells = ["-" if rankings[name][s] is None else str(rankings[name][s]) for s in shares]
        lines.append(f"| {ROW_NAMES[name]} | " + " | ".join(cells) + " |")
    lines += ["", "The selection split's curves: `validation/curve.csv` and `validation/pareto.png`."]
    return lines


def metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers for ``dvc metrics``, in the headline metric ``m`` (``curve.metric``,
    named in each key so two metrics never share a column): ``m_int8`` and ``m_kept`` (the damage
    all-int8 and under the list), ``m_recovered`` (share of the all-int8 damage the list gives
    back) and ``m_random`` (the same for random lists of its size, mean; null when there are
    none). Every metric, the fp32 reference and INC's PTQ check stay in ``validation.json``."""
    m = doc["metric"]
    random = doc["random"]["recovered"][m]["mean"] if doc["random"] else None
    return {
        f"{m}_int8": doc["reference"]["all_int8"][m],
        f"{m}_kept": doc["chosen"]["values"][m],
        f"{m}_recovered": doc["chosen"]["recovered"][m],
        f"{m}_random": random,
    }
