"""The chosen keep-list, measured: on held-out captions, against random lists of its size, and
against INC's own PTQ run from the exported ``op_name_dict``.

Artifact ``reports/validation/validation.json`` (stage ``validate``; its headline numbers, in
``metrics.json``, are DVC metrics: :func:`metrics`)::

    keep_list: {ops, ops_scored, params_kept, params_total, share_params_kept, effective_weight_bits}
    metric: headline metric
    chosen: {values: Values, recovered: {metric: share}}
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

Values and recovered shares as in ``validation.metrics``. The same numbers, in words, are the
"Validation" section of ``op_sensitivity.md`` (:func:`section`), and ``pareto.png`` draws the
chosen list on the ranking curves.
"""

from __future__ import annotations

from typing import Any

from ..inventory import OpInfo, cost
from ..params import CurveParams
from ..phases import METRICS, RANKINGS
from .curve import random_baseline
from .measure import Measurer
from .metrics import damage, recovered

METRIC_NAMES = {
    "kl": "KL(fp32 || quantized) per caption token",
    "top1": "top-1 agreement with fp32",
    "nll": "caption NLL",
    "logit_se": "logit squared error (INC's measure)",
}


def validate_keep_list(
    measurer: Measurer,
    keep: list[str],
    excluded: set[str],
    inventory: list[OpInfo],
    params: CurveParams,
) -> dict[str, Any]:
    """Measure ``keep`` and ``params.random_lists`` random lists of its size on the eval split."""
    ops = measurer.scored
    unknown = sorted(set(keep) - set(ops))
    if unknown:
        raise ValueError(f"keep-list ops the sensitivity pass did not score: {unknown[:5]}")
    all_int8, fp32 = measurer.measure([]), measurer.measure(ops)
    values = measurer.measure(keep)
    chosen = {"values": values, "recovered": recovered(values, all_int8)}
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
        "chosen": chosen,
        "random": baseline,
        "beats_random": beats,
        "reference": {"all_int8": all_int8, "fp32": fp32},
        "inc_ptq": None,
    }


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


def section(doc: dict[str, Any], curve: dict[str, Any], widened: list[dict[str, Any]] | None = None) -> str:
    """The "Validation" section of ``op_sensitivity.md``: what the list buys, in plain words.

    ``widened``: the keep-list's ``groups_widened`` (fused groups kept whole for the runtimes).
    """
    m = doc["metric"]
    k = doc["keep_list"]
    rec = doc["chosen"]["recovered"][m]
    lines = [
        "## Validation on held-out captions",
        "",
        f"Eval split: {curve['eval']['samples']} image+caption pairs from images the calibration sample does "
        f"not use, {curve['eval']['caption_tokens']} caption tokens, teacher-forced. Headline metric: "
        f"{METRIC_NAMES[m]}.",
        "",
        f"The keep-list ({k['ops']} of {k['ops_scored']} ops, {100 * k['share_params_kept']:.2f} % of the "
        f"weight parameters, {k['effective_weight_bits']:.3g} effective weight bits) gives back "
        f"{_pct(rec)} of the all-int8 damage.",
        "",
    ]
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
    best = {name: _smallest_n(curve, name, m, 0.9) for name in RANKINGS}
    lines += [
        "Ops each ranking needs to give back 90 % of the damage: "
        + ", ".join(f"{name} {'-' if n is None else n}" for name, n in best.items())
        + " (see `validation/curve.csv` and `validation/pareto.png`).",
        "",
    ]
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


def _smallest_n(curve: dict[str, Any], ranking: str, metric: str, share: float) -> int | None:
    ns = [
        p["n"]
        for p in curve["points"]
        if p["ranking"] == ranking and p["recovered"][metric] is not None and p["recovered"][metric] >= share
    ]
    return min(ns) if ns else None


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
