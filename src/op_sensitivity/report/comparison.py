"""Compare two sensitivity reports (e.g. the native engine against INC) op by op.

Per phase: Spearman rank correlation, top-10 overlap (by score, most sensitive first), median and
max relative value difference. The requant phase is compared on the per-op increments of the
cumulative curve, not on the cumulative values (those rise along the curve and would correlate
trivially). Ops are matched by module path (INC may suffix ``.module``).

Artifact ``crosscheck.json`` (stage ``crosscheck``; a function of its inputs, no timings)::

    {"candidate": {engine, path, arithmetic}, "reference": {engine, path}, "bar": {...},
     "phases": {fallback|requant: {ops, compared, spearman, top10_overlap, median_rel_diff, max_rel_diff,
                                   largest_diffs: [{module, candidate, reference, rel_diff}]}},
     "passes_bar": bool}

Pure comparison; ``report.crosscheck`` runs the other engine for the stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from ..atomic import read_json
from ..errors import InputError
from ..phases import FALLBACK, PHASES, REQUANT

BAR = {"spearman_min": 0.95, "median_rel_diff_max": 0.10}


def _values(report: dict[str, Any], phase: str) -> pd.Series:
    ops = sorted(report["phases"][phase]["ops"], key=lambda o: o["position"])
    s = pd.Series({o["module"]: o["mse"] for o in ops}, dtype=float)
    cumulative = report["phases"][phase].get("cumulative", phase == REQUANT)
    return s.diff().fillna(s.iloc[0]) if cumulative else s


def compare_phase(
    candidate: dict[str, Any], reference: dict[str, Any], phase: str, top: int = 10
) -> dict[str, Any]:
    a, b = _values(candidate, phase), _values(reference, phase)
    if set(a.index) != set(b.index):
        only = sorted(set(a.index) ^ set(b.index))
        raise InputError(f"crosscheck {phase}: the reports score different ops, e.g. {only[:5]}")
    df = pd.DataFrame({"candidate": a, "reference": b.loc[a.index]})
    # Fallback: low value = sensitive; requant increments: high = sensitive. Rank by sensitivity.
    ascending = phase == FALLBACK and not candidate["phases"][phase].get("cumulative", False)
    top_a = set(df["candidate"].sort_values(ascending=ascending).index[:top])
    top_b = set(df["reference"].sort_values(ascending=ascending).index[:top])
    denom = df["reference"].abs().where(df["reference"].abs() > 0)
    rel = ((df["candidate"] - df["reference"]).abs() / denom).dropna()
    worst = rel.sort_values(ascending=False).head(5)
    return {
        "ops": len(df),
        "compared": "per-op increments of the cumulative curve" if phase == REQUANT else "raw values",
        "spearman": float(df["candidate"].corr(df["reference"], method="spearman")),
        "top10_overlap": len(top_a & top_b) / max(1, min(top, len(df))),
        "median_rel_diff": float(rel.median()) if len(rel) else 0.0,
        "max_rel_diff": float(rel.max()) if len(rel) else 0.0,
        "largest_diffs": [
            {
                "module": m,
                "candidate": float(df.at[m, "candidate"]),
                "reference": float(df.at[m, "reference"]),
                "rel_diff": float(v),
            }
            for m, v in worst.items()
        ],
    }


def crosscheck(
    candidate: dict[str, Any],
    reference: dict[str, Any],
    candidate_path: Path | None = None,
    reference_path: Path | None = None,
) -> dict[str, Any]:
    """Compare two sensitivity reports phase by phase; both requant curves must be cumulative."""
    if reference["phases"][REQUANT].get("cumulative") is False:
        raise InputError(
            "crosscheck: the reference's requant phase is isolated; compare cumulative with "
            "cumulative (INC only has cumulative)"
        )
    if candidate["phases"][REQUANT].get("cumulative") is False:
        raise InputError(
            "crosscheck: the candidate ran requant_mode isolated; rerun it cumulative to compare with INC"
        )
    phases = {p: compare_phase(candidate, reference, p) for p in PHASES}
    passes = all(
        v["spearman"] >= BAR["spearman_min"] and v["median_rel_diff"] <= BAR["median_rel_diff_max"]
        for v in phases.values()
    )
    return {
        "candidate": {"engine": candidate["engine"], "path": str(candidate_path) if candidate_path else None},
        "reference": {"engine": reference["engine"], "path": str(reference_path) if reference_path else None},
        "bar": BAR,
        "phases": phases,
        "passes_bar": passes,
    }


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Crosscheck {result['candidate']['engine']} vs {result['reference']['engine']}: "
        f"{'meets' if result['passes_bar'] else 'MISSES'} the bar (Spearman >= "
        f"{BAR['spearman_min']}, median relative difference <= {BAR['median_rel_diff_max']:.0%})."
    ]
    for phase, v in result["phases"].items():
        lines.append(
            f"- {phase} ({v['compared']}, {v['ops']} ops): Spearman {v['spearman']:.3f}, top-10 overlap "
            f"{v['top10_overlap']:.0%}, median rel. diff {v['median_rel_diff']:.2%}, "
            f"max {v['max_rel_diff']:.2%}"
        )
    return lines


def read_crosscheck(path: Path) -> dict[str, Any]:
    """Read ``crosscheck.json`` back, checking the fields the report renders."""
    doc = read_json(path, "crosscheck result", "crosscheck")
    ok = (
        isinstance(doc, dict)
        and isinstance(doc.get("passes_bar"), bool)
        and isinstance(doc.get("phases"), dict)
    )
    ok = ok and all(
        isinstance(doc.get(k), dict) and isinstance(doc[k].get("engine"), str)
        for k in ("candidate", "reference")
    )
    for phase in PHASES:
        v = doc["phases"].get(phase) if ok else None
        ok = (
            ok
            and isinstance(v, dict)
            and all(
                isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool) and math.isfinite(v[k])
                for k in ("ops", "spearman", "top10_overlap", "median_rel_diff", "max_rel_diff")
            )
        )
        ok = ok and isinstance(v.get("compared"), str)
    if not ok:
        raise InputError(
            f"{path}: not a crosscheck result (expected candidate/reference engines, passes_bar and per "
            "phase ops, compared, spearman, top10_overlap, median_rel_diff, max_rel_diff)"
        )
    return doc
