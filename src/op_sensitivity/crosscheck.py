"""Compare two sensitivity reports (e.g. the native engine against INC) op by op.

Per phase: Spearman rank correlation, top-10 overlap (by score, most sensitive first), median and
max relative value difference. The requant phase is compared on the per-op increments of the
cumulative curve, not on the cumulative values (those rise along the curve and would correlate
trivially). Ops are matched by module path (INC may suffix ``.module``).

Artifact ``crosscheck.json``::

    {"candidate": {engine, path}, "reference": {engine, path}, "bar": {...},
     "phases": {fallback|requant: {ops, spearman, top10_overlap, median_rel_diff, max_rel_diff,
                                   largest_diffs: [{module, candidate, reference, rel_diff}]}},
     "passes_bar": bool}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .errors import InputError

BAR = {"spearman_min": 0.95, "median_rel_diff_max": 0.10}
PHASES = ("fallback", "requant")


def _values(report: dict[str, Any], phase: str) -> pd.Series:
    ops = sorted(report["phases"][phase]["ops"], key=lambda o: o["position"])
    s = pd.Series({o["module"]: o["mse"] for o in ops}, dtype=float)
    cumulative = report["phases"][phase].get("cumulative", phase == "requant")
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
    ascending = phase == "fallback" and not candidate["phases"][phase].get("cumulative", False)
    top_a = set(df["candidate"].sort_values(ascending=ascending).index[:top])
    top_b = set(df["reference"].sort_values(ascending=ascending).index[:top])
    denom = df["reference"].abs().where(df["reference"].abs() > 0)
    rel = ((df["candidate"] - df["reference"]).abs() / denom).dropna()
    worst = rel.sort_values(ascending=False).head(5)
    return {
        "ops": len(df),
        "compared": "per-op increments of the cumulative curve" if phase == "requant" else "raw values",
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
    for name, rep in (("candidate", candidate), ("reference", reference)):
        if rep["phases"]["requant"].get("cumulative") is False and name == "reference":
            raise InputError(
                "crosscheck: the reference's requant phase is isolated; compare cumulative with "
                "cumulative (INC only has cumulative)"
            )
    if candidate["phases"]["requant"].get("cumulative") is False:
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


def run_crosscheck(
    params,
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
    report_path: Path,
    out_path: Path,
    workspace: Path,
) -> dict[str, Any]:
    """Run the engine the report was not made with on the same inputs and compare (native vs INC).

    The native engine is always the candidate and INC the reference; the native run uses
    ``requant_mode: cumulative`` here, whatever params say, so the two curves are comparable.
    """
    from dataclasses import replace

    from .atomic import dump_json
    from .sensitivity import load_inputs, run_engine
    from .sensitivity_report import build_report, read_report

    stored = read_report(report_path)
    params = replace(params, native=replace(params.native, requant_mode="cumulative"))
    other = "native" if stored["engine"] == "inc" else "inc"
    model, loader, inventory, metadata = load_inputs(params, cal_dir, model_dir, inventory_path)
    fresh = build_report(
        run_engine(other, params, model, loader, inventory, metadata["calibration"]["mode"], workspace),
        inventory,
        metadata,
    )
    if stored["engine"] == "native" and stored["phases"]["requant"].get("cumulative") is False:
        raise InputError(f"{report_path}: made with requant_mode isolated; crosscheck needs cumulative")
    native, inc = (fresh, stored) if other == "native" else (stored, fresh)
    result = crosscheck(native, inc)
    result["candidate"].update(
        {
            "arithmetic": native["metadata"].get("engine_details", {}).get("arithmetic"),
            "seconds": native["metadata"]["seconds"],
        }
    )
    result["reference"]["seconds"] = inc["metadata"]["seconds"]
    dump_json(result, out_path)
    return result
