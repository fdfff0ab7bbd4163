"""Stage rank_report: op_sensitivity.json -> reports/op_sensitivity.md, PNG plots, scores and metrics."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml

from op_sensitivity.cli import run_stage
from op_sensitivity.errors import InputError
from op_sensitivity.inventory import read_inventory
from op_sensitivity.rank_report import write_rank_report
from op_sensitivity.sensitivity_report import read_report


def _report_params(path: str) -> tuple[int | None, int]:
    block = (yaml.safe_load(Path(path).read_text()) or {}).get("report", {})
    top, plot_top = block.get("table_top"), block.get("plot_top", 30)
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise InputError(f"{path}: report.table_top: expected an integer >= 1 or null (all ops), got {top!r}")
    if isinstance(plot_top, bool) or not isinstance(plot_top, int) or plot_top < 1:
        raise InputError(f"{path}: report.plot_top: expected an integer >= 1, got {plot_top!r}")
    return top, plot_top


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sensitivity", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--inventory", default="reports/model/op_inventory.json", type=Path)
    ap.add_argument(
        "--crosscheck", default=None, type=Path, help="crosscheck.json to summarise in the report"
    )
    ap.add_argument("--out-dir", default="reports", type=Path)
    args = ap.parse_args(argv)
    top, plot_top = _report_params(args.params)
    check = json.loads(args.crosscheck.read_text()) if args.crosscheck else None
    m = write_rank_report(
        read_report(args.sensitivity), read_inventory(args.inventory), args.out_dir, top, plot_top, check
    )
    logging.getLogger("rank_report").info(
        "report written to %s: spearman %.3f, most sensitive %s",
        args.out_dir / "op_sensitivity.md",
        m["phase_spearman"],
        m["fallback"]["most_sensitive"],
    )


if __name__ == "__main__":
    run_stage(main)
