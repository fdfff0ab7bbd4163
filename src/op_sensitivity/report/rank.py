"""Stage rank_report: ``op_sensitivity.json`` -> a report people read and plots they look at.

Outputs (under the report dir, default ``reports/``):

* ``op_sensitivity.md``: per phase ``rank | op_name | op_type | tower | mse_value | score``, most
  sensitive first; summaries per tower and per op type; phase agreement; run metadata.
* ``plots/*.png``: spectrum, score vs depth, cumulative error share, requant curve.
* ``rank/scores.csv``: every op x phase (the data behind the plots); ``rank/top_<phase>.csv``:
  the top ops for ``dvc plots`` (template ``bar_horizontal_sorted``).
* ``rank/summary.json``: the spectrum's shape in numbers, see :func:`summary` (git-tracked, not a
  DVC metric: per-op names and one Spearman per scheme pair are details, not headlines).
* ``rank/stability.json``, ``rank/stability_metrics.json``, ``plots/rank_intervals.png`` and the
  "Stability" section: ``report.stability`` (written by the stage beside these).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import atomic_file, dump_json
from ..errors import InputError
from ..inventory import TOWERS, OpInfo
from ..params import ReportParams
from ..phases import FALLBACK, PHASES, REQUANT
from . import plots
from .comparison import summary_lines
from .scores import agreement, all_int8_error, all_int8_source, phase_scores

SCORE_DOC = {
    FALLBACK: "score = (E - mse) / E: share of the all-int8 error E removed by keeping only this op fp32",
    REQUANT: "score = (mse_i - mse_{i-1}) / E: the increment this op adds to INC's cumulative curve",
}


def top_share(df: pd.DataFrame, fraction: float = 0.05) -> float:
    """Share of the summed positive score held by the top ``fraction`` of ops (at least one op)."""
    positive = df["score"].clip(lower=0)
    k = max(1, math.ceil(fraction * len(df)))
    total = positive.sum()
    return float(positive.iloc[:k].sum() / total) if total > 0 else 0.0


def summary(scores: dict[str, pd.DataFrame], rho: float) -> dict[str, Any]:
    """Size, concentration, phase agreement and the leaders of each phase, per tower."""
    out: dict[str, Any] = {"phase_spearman": round(rho, 6)}
    for phase, df in scores.items():
        out[phase] = {
            "ops": len(df),
            "top5pct_error_share": round(top_share(df), 6),
            "max_score": round(float(df["score"].max()), 6),
            "most_sensitive": {
                t: df.loc[df["tower"] == t, "module"].iloc[0] for t in TOWERS if (df["tower"] == t).any()
            },
        }
    return out


def _table(df: pd.DataFrame) -> str:
    t = df[["rank", "op_name", "op_type", "tower", "mse", "score"]].rename(columns={"mse": "mse_value"})
    return t.to_markdown(index=False, floatfmt=".6g")


def _summary(df: pd.DataFrame, by: str) -> str:
    g = df.groupby(by).agg(
        ops=("op_name", "count"),
        score_sum=("score", "sum"),
        score_max=("score", "max"),
        best_rank=("rank", "min"),
        params=("params", "sum"),
    )
    return g.sort_values("score_sum", ascending=False).reset_index().to_markdown(index=False, floatfmt=".4g")


def _check_words(screening: dict[str, Any]) -> str:
    """The bound's check on a sample of unrefined ops (reports from before it: nothing)."""
    check = screening.get("check")
    if not check:
        return ""
    if check["observed_ratio"] is None:
        return "; no op was left unrefined to check the assumption on"
    n = sum(map(len, check["ops"].values()))
    return f", a seeded sample of {n} unrefined ops (float32) at most {check['observed_ratio']:.3g}"


def screening_lines(screening: dict[str, Any] | None) -> list[str]:
    """What a screened pass measured in which precision (``engines.screening``); nothing otherwise."""
    if screening is None:
        return []
    if screening["precision"] == "first_order":
        return first_order_lines(screening) + budget_lines(screening)
    refined = ", ".join(f"{len(ops)} {phase}" for phase, ops in screening["refined"].items())
    return [
        f"> **Screened in {screening['precision']}**: every trial ran in {screening['precision']}, then "
        f"the ops that could stand in the top {screening['exact_top']} of fallback, requant or both were "
        f"measured again in float32 ({refined}; `precision` per op in op_sensitivity.json). That top is "
        "float32's, in float32's order, as far as the bound's assumption holds (no mixed state rounds "
        f"worse than the two ends); below it the order is the screen's. Bound margin "
        f"{screening['margin_used']:.3g} (asked {screening['margin']:.3g}); the refined ops used at most "
        f"{screening['observed_ratio']:.3g} of the measured rounding error" + _check_words(screening) + ".",
        "",
        *budget_lines(screening),
    ]


def budget_lines(screening: dict[str, Any]) -> list[str]:
    """Where ``exact_budget`` stopped the selection before a top was settled; nothing otherwise."""
    unsettled = screening.get("budget", {}).get("unsettled", {})
    if not unsettled:
        return []
    left = "; ".join(
        f"{phase}: {len(ops)} ({', '.join(ops[:5])}{', ...' if len(ops) > 5 else ''})"
        for phase, ops in unsettled.items()
    )
    return [
        f"> **Top not settled**: the exact budget ({screening['budget']['exact_budget']} ops per phase, "
        f"sensitivity.native.exact_budget) ran out while these trials could still change the top "
        f"{screening['exact_top']} ({left}). That top, and both's, may not be the exact order: raise "
        "exact_budget (or set it to null) to settle it.",
        "",
    ]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def first_order_lines(screening: dict[str, Any]) -> list[str]:
    """What a first_order pass estimated, measured exactly, and what its audit says (per phase)."""
    est = screening["estimate"]
    per_batch = est["per_batch"]
    passes = sum(b["forwards"] for b in per_batch), sum(b["backwards"] for b in per_batch)
    lines = [
        f"> **Estimated from gradients (first_order)**: every op's two values were estimated from "
        f"{passes[0]} forward and {passes[1]} backward passes over {len(per_batch)} confidence batches "
        f"({est['points']} points on INC's cumulative curve, {est['probes']} Hutchinson probes; "
        "docs/engines.md), then a seeded audit and every op that could stand in the top "
        f"{screening['exact_top']} of fallback, requant or both were measured exactly (`precision` per op "
        f"in op_sensitivity.json: exact or estimated). Bound: the audit's largest error, margin "
        f"{screening['margin_used']:.3g} (asked {screening['margin']:.3g})"
        + (f", widened {len(screening['widened'])} times" if screening["widened"] else "")
        + ".",
        "",
        "| phase | measured exactly | audit | Spearman (audit) | top recall (estimate alone) | "
        "found by the check | chance a blind op escapes |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, audit in screening["audit"].items():
        measured = len({*screening["refined"][phase], *screening["check"]["ops"][phase], *audit["measured"]})
        lines.append(
            f"| {phase} | {measured} | {len(audit['ops'])} | {_fmt(audit['spearman'])} | "
            f"{audit['recall']:.2f} | {', '.join(audit['found']) or 'none'} | {audit['escape']:.2f} |"
        )
    lines += [
        "",
        "A blind op (its damage invisible to the estimate) is caught only if the audit or the check draws "
        "it; the last column is that chance of missing one, from the draws this run made.",
        "",
    ]
    return lines


def render_markdown(
    report: dict[str, Any],
    scores: dict[str, pd.DataFrame],
    rho: float,
    worst: pd.DataFrame,
    top: int | None,
    check: dict[str, Any] | None = None,
    sections: list[str] | None = None,
) -> str:
    meta = report["metadata"]
    model = meta["model"]
    lines = ["# Op sensitivity report", ""]
    if model.get("random_weights"):
        lines += [
            "> **Random weights**: this model was built with seeded random weights; the spectrum shows the",
            "> pipeline working, not the sensitivity of a trained model.",
            "",
        ]
    lines += [
        f"Model: {model['origin']} ({model['params']:,} params, sha256 `{model['sha256'][:12]}`). "
        f"Engine: {report['engine']}. Error measured at `{meta['measured_at']}`.",
        "",
        f"All-int8 error E = {all_int8_error(report):.6g} (source: {all_int8_source(report)}). "
        "Higher score = more sensitive.",
        "",
    ]
    lines += screening_lines(meta.get("screening"))
    for phase in PHASES:
        df = scores[phase]
        shown = df if top is None else df.head(top)
        lines += [
            f"## Phase `{phase}`",
            "",
            SCORE_DOC[phase] + ".",
            "",
            f"{len(df)} ops; top {len(shown)} shown; full table in `rank/scores.csv`.",
            "",
            _table(shown),
            "",
            "### Per tower",
            "",
            _summary(df, "tower"),
            "",
            "### Per op type",
            "",
            _summary(df, "op_type"),
            "",
        ]
    lines += [
        "## Phase agreement",
        "",
        f"Spearman rank correlation of the two phases' scores: **{rho:.3f}**.",
        "",
        "Ops where the phases disagree most:",
        "",
        worst.to_markdown(index=False),
        "",
        *(
            ["## Engine crosscheck", "", summary_lines(check)[0], "", *summary_lines(check)[1:], ""]
            if check
            else []
        ),
        *[line for text in sections or [] for line in (text.rstrip("\n"), "")],
        "## Plots",
        "",
        "![spectrum](plots/spectrum.png)",
        "",
        "![depth](plots/depth.png)",
        "",
        "![cumulative](plots/cumulative_share.png)",
        "",
        "![requant curve](plots/requant_curve.png)",
        "",
        "## Run metadata",
        "",
    ]
    cal = meta["calibration"]
    rows = [
        (
            "INC / torch / transformers",
            " / ".join(meta["versions"][k] for k in ("neural_compressor", "torch", "transformers")),
        ),
        (
            "calibration",
            f"{cal['mode']}, {cal['samples_used']} samples used of {cal['manifest_records']}, "
            f"batch {cal['batch_size']}, {cal['confidence_batches']} confidence batches",
        ),
        ("measure", meta["measure"]),
        ("aggregation", meta["aggregation"]),
        (
            "excluded ops",
            ", ".join(f"{e['op_name']} ({e['reason']})" for e in meta["excluded_ops"]) or "none",
        ),
        ("Conv3d", meta["conv3d_handling"]),
    ]
    lines += [pd.DataFrame(rows, columns=["", "value"]).to_markdown(index=False), ""]
    return "\n".join(lines)


def read_section(path: Path) -> str:
    """A Markdown section another stage rendered (``validate``'s), to append to the report."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as e:
        raise InputError(f"{path}: report section missing (run the stage that writes it first)") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text file ({e})") from e
    if not text.startswith("## "):
        raise InputError(f"{path}: expected a Markdown section starting with '## '")
    return text


def write_rank_report(
    report: dict[str, Any],
    inventory: list[OpInfo],
    out_dir: Path,
    params: ReportParams,
    check: dict[str, Any] | None = None,
    sections: list[str] | None = None,
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    top, plot_top = params.table_top, params.plot_top
    scores = phase_scores(report, inventory)
    rho, worst = agreement(scores)
    rank_dir = out_dir / "rank"
    rank_dir.mkdir(parents=True, exist_ok=True)
    columns = [
        "phase",
        "rank",
        "op_name",
        "module",
        "op_type",
        "tower",
        "depth",
        "position",
        "params",
        "mse",
        "score",
    ]
    table = pd.concat([scores[p][columns] for p in PHASES], ignore_index=True)
    with atomic_file(rank_dir / "scores.csv") as tmp:
        table.to_csv(tmp, index=False)
    for phase in PHASES:
        with atomic_file(rank_dir / f"top_{phase}.csv") as tmp:
            scores[phase].head(plot_top)[["module", "score"]].to_csv(tmp, index=False)
    plot_dir = out_dir / "plots"
    plots.spectrum(scores, plot_dir / "spectrum.png", top=plot_top)
    plots.depth(scores, plot_dir / "depth.png")
    plots.cumulative(scores, plot_dir / "cumulative_share.png")
    plots.requant_curve(scores[REQUANT], plot_dir / "requant_curve.png")
    with atomic_file(out_dir / "op_sensitivity.md") as tmp:
        tmp.write_text(render_markdown(report, scores, rho, worst, top, check, sections or []))
    m = {"all_int8_mse": all_int8_error(report), **summary(scores, rho), **(extra_summary or {})}
    dump_json(m, rank_dir / "summary.json")
    return m
