"""Stage crosscheck: rerun the sensitivity pass with the other engine and compare (native vs INC)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from op_sensitivity.cli import run_stage
from op_sensitivity.crosscheck import run_crosscheck, summary_lines
from op_sensitivity.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--calibration", default="data/calibration", type=Path)
    ap.add_argument("--model", default="models/qwen2_5_vl", type=Path)
    ap.add_argument("--inventory", default="reports/model/op_inventory.json", type=Path)
    ap.add_argument("--sensitivity", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--out", default="reports/sensitivity/crosscheck.json", type=Path)
    ap.add_argument("--workspace", default=".op_sensitivity_work/crosscheck", type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params).sensitivity
    result = run_crosscheck(
        params, args.calibration, args.model, args.inventory, args.sensitivity, args.out, args.workspace
    )
    for line in summary_lines(result):
        logging.getLogger("crosscheck").info(line)


if __name__ == "__main__":
    run_stage(main)
