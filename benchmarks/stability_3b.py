"""The stability verdict of a sensitivity pass, from its per-batch values (no new forwards).

    python benchmarks/stability_3b.py --workdir /tmp/dag3b_8 --top 5 \\
        --out benchmarks/results/cpu-2026-12-02/stability_3b.json

``--workdir``: a DAG workdir whose ``sensitivity`` stage ran (``benchmarks/whole_dag.py --until
sensitivity``). What ``rank_report`` computes (``report.stability``), for the top ``--top`` of each
phase taken as the list: the DAG's later stages (curve, validate) did not run, so the list a policy
would ship is not known; the top of each ranking stands in for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from op_sensitivity.engines.artifact import read_report
from op_sensitivity.inventory import read_inventory
from op_sensitivity.phases import FALLBACK, REQUANT
from op_sensitivity.report.scores import phase_scores
from op_sensitivity.report.stability import ChosenList, stability


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    report = read_report(args.workdir / "reports" / "sensitivity" / "op_sensitivity.json")
    inventory = read_inventory(args.workdir / "reports" / "model" / "op_inventory.json")
    scores = phase_scores(report, inventory)
    result = {"top": args.top, "screening": report["metadata"].get("screening", {}).get("budget")}
    for phase in (FALLBACK, REQUANT):
        top = list(scores[phase]["module"][: args.top])
        doc = stability(report, inventory, ChosenList(top, phase, "top_k"))
        result[phase] = {
            "top": top,
            "confidence_batches": doc["confidence_batches"],
            "bootstrap": doc["bootstrap"],
            "resamples": doc["resamples"],
            "list": {k: v for k, v in doc["list"].items() if k != "ops"},
            "stable": doc["stable"],
            "verdict": doc["verdict"],
            "top_intervals": doc["phases"][phase]["ops"][: args.top],
        }
        print(phase, doc["verdict"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
