"""One model's spectrum under several deployment schemes, side by side (stage rank_report).

Each scheme scores the ops its tool quantizes (ModelOpt's stock configs leave the vision tower and
``lm_head`` alone, compressed-tensors quantizes Linear only), so a pair of schemes is compared on
the ops both score: Spearman of the phase scores over all of them and per tower, and the ops whose
rank moves most (ranks renumbered among the common ops). Each scheme's all-int8 error says how
much the scheme as a whole damages the model.

Document (``reports/rank/schemes.json``)::

    schemes: {name: {source, all_int8_mse, ops_scored, most_sensitive: {fallback, requant}}}
    pairs: [{a, b, phase, ops, spearman, by_tower: {tower: {ops, spearman}},
             moves: [{module, tower, rank_a, rank_b, shift}]}]

``spearman`` is null where fewer than 3 common ops (or a constant score) leave nothing to rank.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

import pandas as pd

from ..engines.artifact import read_report, scheme_name
from ..errors import InputError
from ..inventory import OpInfo
from ..phases import PHASES
from .scores import all_int8_error, phase_scores

SPECTRUM = "op_sensitivity.json"


def scheme_report_path(schemes_dir: Path, name: str) -> Path:
    return schemes_dir / name / SPECTRUM


def read_spectra(schemes_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The listed schemes' reports; each must exist and say it was measured under its scheme."""
    out = {}
    for name in names:
        path = scheme_report_path(schemes_dir, name)
        if not path.exists():
            raise InputError(
                f"{path}: missing; schemes.run lists {name} (run `dvc repro scheme_sensitivity`)"
            )
        report = read_report(path)
        if scheme_name(report) != name:
            raise InputError(f"{path}: measured under scheme {scheme_name(report)!r}, expected {name!r}")
        out[name] = report
    return out


def _spearman(a: pd.Series, b: pd.Series) -> float | None:
    if len(a) < 3:
        return None
    rho = a.corr(b, method="spearman")
    return None if math.isnan(rho) else round(float(rho), 6)


def _pair(a: str, b: str, da: pd.DataFrame, db: pd.DataFrame, top: int) -> dict[str, Any]:
    fa, fb = da.set_index("module"), db.set_index("module")
    common = [m for m in fa.index if m in fb.index]
    sa, sb = fa.loc[common, "score"], fb.loc[common, "score"]
    by_tower = {}
    for tower in sorted(set(fa.loc[common, "tower"])):
        ms = [m for m in common if fa.at[m, "tower"] == tower]
        by_tower[tower] = {"ops": len(ms), "spearman": _spearman(sa[ms], sb[ms])}
    ranks = pd.DataFrame(
        {
            "module": common,
            "tower": fa.loc[common, "tower"].values,
            "rank_a": sa.rank(ascending=False, method="first").astype(int).values,
            "rank_b": sb.rank(ascending=False, method="first").astype(int).values,
        }
    )
    ranks["shift"] = ranks["rank_b"] - ranks["rank_a"]
    moves = ranks.reindex(ranks["shift"].abs().sort_values(ascending=False, kind="stable").index).head(top)
    return {
        "a": a,
        "b": b,
        "ops": len(common),
        "spearman": _spearman(sa, sb),
        "by_tower": by_tower,
        "moves": moves.to_dict("records"),
    }


def compare_schemes(
    spectra: dict[str, dict[str, Any]], inventory: list[OpInfo], top: int = 5
) -> dict[str, Any]:
    scores = {name: phase_scores(report, inventory) for name, report in spectra.items()}
    schemes = {
        name: {
            "source": spectra[name]["engine"],
            "all_int8_mse": all_int8_error(spectra[name]),
            "ops_scored": len(s[PHASES[0]]),
            "most_sensitive": {p: s[p]["module"].iloc[0] for p in PHASES},
        }
        for name, s in scores.items()
    }
    pairs = [
        {"phase": p, **_pair(a, b, scores[a][p], scores[b][p], top)}
        for a, b in combinations(scores, 2)
        for p in PHASES
    ]
    return {"schemes": schemes, "pairs": pairs}


def scheme_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """For ``rank/summary.json``: each scheme's all-int8 error and each pair's Spearman per phase."""
    return {
        "all_int8_mse": {n: s["all_int8_mse"] for n, s in doc["schemes"].items()},
        "spearman": {f"{p['a']}~{p['b']}:{p['phase']}": p["spearman"] for p in doc["pairs"]},
    }


def _fmt(rho: float | None) -> str:
    return "n/a" if rho is None else f"{rho:.3f}"


def render_section(doc: dict[str, Any]) -> str:
    lines = [
        "## Deployment schemes",
        "",
        "The same pass under each scheme (`schemes.run`; docs/engines.md). A scheme scores only "
        "the ops its tool quantizes; pairs are compared on the ops both score.",
        "",
        "| scheme | measured by | ops scored | all-int8 error | most sensitive (fallback) | (requant) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in doc["schemes"].items():
        ms = s["most_sensitive"]
        lines.append(
            f"| {name} | {s['source']} | {s['ops_scored']} | {s['all_int8_mse']:.4g} "
            f"| `{ms['fallback']}` | `{ms['requant']}` |"
        )
    lines += [
        "",
        "| pair | phase | common ops | Spearman | per tower | largest rank moves |",
        "|---|---|---|---|---|---|",
    ]
    for p in doc["pairs"]:
        towers = ", ".join(f"{t} {_fmt(v['spearman'])} ({v['ops']})" for t, v in p["by_tower"].items())
        moves = ", ".join(f"`{m['module']}` {m['rank_a']}->{m['rank_b']}" for m in p["moves"][:3])
        rho = _fmt(p["spearman"])
        lines.append(f"| {p['a']} vs {p['b']} | {p['phase']} | {p['ops']} | {rho} | {towers} | {moves} |")
    return "\n".join(lines) + "\n"
