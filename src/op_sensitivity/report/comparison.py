"""Compare two sensitivity reports (e.g. the native engine against INC) op by op.

Per phase: Spearman rank correlation, top-10 overlap (by score, most sensitive first), median and
max relative value difference. The requant phase is compared on the per-op increments of the
cumulative curve, not on the cumulative values (those rise along the curve and would correlate
trivially). Ops are matched by module path (INC may suffix ``.module``).

Artifact ``crosscheck.json`` (stage ``crosscheck``; a function of its inputs, no timings)::

    {"candidate": {engine, path, arithmetic}, "reference": {engine, path}, "bar": {...},
     "phases": {fallback|requant: {ops, compared, spearman, top10_overlap, median_rel_diff, max_rel_diff,
                                   largest_diffs: [{module, candidate, reference, rel_diff}]}},
     "passes_bar": bool, "checked_scheme": "inc_cpu", "checked_requant_mode": "cumulative",
     "native_rerun": str | null (why the candidate is a native rerun in INC's numerics, not the
                     report: the report's scheme or its isolated requant mode; whole model only),
     "compared": {model: "whole" | "carved", model_sha256, params, whole_max_params (null: two
                  reports compared outside the stage),
                  carved only: source_params, decoder_layers, of_decoder_layers, vision_blocks,
                  of_vision_blocks, vocab, of_vocab}}

``compared.model_sha256`` is the weights' content hash (the model card's); a carved copy keeps
the first decoder layers and vision blocks of those weights and the vocabulary rows the batches
use (``model.carve``), and scores every op it has.

Its headline number (:func:`agreement`, ``agreement.json``) is the stage's DVC metric:
``engine_rho``, the lowest Spearman of the two phases, to 6 digits (the relative differences
stay in ``crosscheck.json``).

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


def whole_model(report: dict[str, Any], whole_max_params: int | None = None) -> dict[str, Any]:
    """``compared`` for two reports of the whole model (``report``'s)."""
    model = report["metadata"]["model"]
    return {
        "model": "whole",
        "model_sha256": model["sha256"],
        "params": model["params"],
        "whole_max_params": whole_max_params,
    }


def crosscheck(
    candidate: dict[str, Any],
    reference: dict[str, Any],
    candidate_path: Path | None = None,
    reference_path: Path | None = None,
    compared: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare two sensitivity reports phase by phase; both requant curves must be cumulative.

    ``compared``: what the two reports were measured on (default: the candidate's whole model)."""
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
        "compared": compared or whole_model(candidate),
    }


def agreement(result: dict[str, Any]) -> dict[str, Any]:
    """The crosscheck's headline number for ``dvc metrics`` (module doc)."""
    phases = result["phases"].values()
    return {"engine_rho": round(min(p["spearman"] for p in phases), 6)}


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Crosscheck {result['candidate']['engine']} vs {result['reference']['engine']}: "
        f"{'meets' if result['passes_bar'] else 'MISSES'} the bar (Spearman >= "
        f"{BAR['spearman_min']}, median relative difference <= {BAR['median_rel_diff_max']:.0%})."
    ]
    compared = result.get("compared")
    if compared is not None:
        lines.append(compared_line(compared))
    if result.get("native_rerun"):
        lines.append(f"Not the report's own values: {result['native_rerun']}.")
    for phase, v in result["phases"].items():
        lines.append(
            f"- {phase} ({v['compared']}, {v['ops']} ops): Spearman {v['spearman']:.3f}, top-10 overlap "
            f"{v['top10_overlap']:.0%}, median rel. diff {v['median_rel_diff']:.2%}, "
            f"max {v['max_rel_diff']:.2%}"
        )
    return lines


def compared_line(c: dict[str, Any]) -> str:
    """What the crosscheck ran on, in words (``report.crosscheck`` writes ``compared``)."""
    sha = c["model_sha256"][:12]
    if c["model"] == "whole":
        bound = c.get("whole_max_params")
        within = f", within crosscheck.whole_max_params = {bound:,}" if bound is not None else ""
        return f"Compared on the whole model (sha256 {sha}, {c['params']:,} parameters{within})."
    return (
        f"Compared on a copy carved from the model's weights (sha256 {sha}): the first "
        f"{c['decoder_layers']} of {c['of_decoder_layers']} decoder layers, {c['vision_blocks']} of "
        f"{c['of_vision_blocks']} vision blocks and the {c['vocab']:,} of {c['of_vocab']:,} vocabulary rows "
        f"the batches use, {c['params']:,} of {c['source_params']:,} parameters; every op of the copy "
        "scored by both engines on the same calibration batches. The model exceeds "
        f"crosscheck.whole_max_params = {c['whole_max_params']:,}: INC's per-op loop copies the whole "
        'model for every op (docs/engines.md, "Crosscheck").'
    )


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
    compared = doc.get("compared") if ok else None
    ok = ok and isinstance(compared, dict) and compared.get("model") in ("whole", "carved")
    ok = ok and isinstance(compared.get("params"), int) and isinstance(compared.get("model_sha256"), str)
    ok = ok and isinstance(compared.get("whole_max_params"), (int, type(None)))
    if ok and compared["model"] == "carved":
        keys = (
            "source_params",
            "decoder_layers",
            "of_decoder_layers",
            "vision_blocks",
            "of_vision_blocks",
            "vocab",
            "of_vocab",
        )
        ok = all(isinstance(compared.get(k), int) for k in keys)
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
            f"{path}: not a crosscheck result (expected candidate/reference engines, passes_bar, what was "
            "compared (whole or carved model) and per phase ops, compared, spearman, top10_overlap, "
            "median_rel_diff, max_rel_diff; rerun the crosscheck stage)"
        )
    return doc
