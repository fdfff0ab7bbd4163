"""Two sensitivity reports of the same ops side by side: how far a change moved the spectrum.

    python benchmarks/compare_spectra.py BEFORE.json AFTER.json --top 10 --out result.json

Per phase: Spearman of the per-op values, the overlap of the top ``--top`` by rank, the median and
largest relative change of an op's value, and how many ops each report measured exactly (``precision``
other than ``estimated``).
Written for the 3D rotary positions fix (docs/benchmarks.md): the same random 3B weights, the same
captions and params, scored by the code before and after it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from op_sensitivity.engines.artifact import read_report


def phase_frame(report: dict, phase: str) -> pd.DataFrame:
    ops = report["phases"][phase]["ops"]
    return pd.DataFrame(
        {"module": o["module"], "value": o["mse"], "rank": o["rank"], "precision": o.get("precision")}
        for o in ops
    ).set_index("module")


def compare(before: dict, after: dict, top: int) -> dict:
    out = {}
    for phase in ("fallback", "requant"):
        a, b = phase_frame(before, phase), phase_frame(after, phase)
        if set(a.index) != set(b.index):
            raise SystemExit(f"{phase}: the reports score different ops ({len(a)} vs {len(b)})")
        b = b.loc[a.index]
        rel = ((b["value"] - a["value"]).abs() / a["value"].abs()).replace([float("inf")], float("nan"))
        top_a = set(a.nsmallest(top, "rank").index)
        top_b = set(b.nsmallest(top, "rank").index)
        out[phase] = {
            "ops": len(a),
            "spearman": round(float(a["value"].corr(b["value"], method="spearman")), 4),
            f"top{top}_overlap": len(top_a & top_b),
            "median_rel_change": round(float(rel.median()), 4),
            "max_rel_change": round(float(rel.max()), 4),
            # an exact pass leaves precision out: every op is exact there
            "exact": {
                "before": int((a["precision"] != "estimated").sum()),
                "after": int((b["precision"] != "estimated").sum()),
            },
            f"top{top}_before": sorted(top_a, key=lambda m: a.loc[m, "rank"]),
            f"top{top}_after": sorted(top_b, key=lambda m: b.loc[m, "rank"]),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    doc = {
        "before": str(args.before),
        "after": str(args.after),
        **compare(read_report(args.before), read_report(args.after), args.top),
    }
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
