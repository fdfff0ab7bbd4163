"""Stage crosscheck: INC and the native engine on the same inputs, compared: the whole model, or a
copy carved from its weights above ``crosscheck.whole_max_params`` (``report.crosscheck``)."""

from __future__ import annotations

import logging
from pathlib import Path

from op_sensitivity.atomic import dump_json
from op_sensitivity.cli import pass_input_parser, run_stage
from op_sensitivity.params import load_params
from op_sensitivity.report.comparison import agreement, summary_lines
from op_sensitivity.report.crosscheck import run_crosscheck


def main(argv: list[str] | None = None) -> None:
    ap = pass_input_parser(__doc__)
    ap.add_argument("--sensitivity", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--out", default="reports/sensitivity/crosscheck.json", type=Path)
    ap.add_argument(
        "--metrics",
        default="reports/sensitivity/agreement.json",
        type=Path,
        help="the headline numbers (a DVC metric)",
    )
    ap.add_argument(
        "--runtime", default=None, type=Path, help="the rerun's seconds and memory (a DVC metric)"
    )
    ap.add_argument("--workspace", default=".op_sensitivity_work/crosscheck", type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    result = run_crosscheck(
        params.sensitivity,
        params.crosscheck,
        args.calibration,
        args.model,
        args.inventory,
        args.sensitivity,
        args.out,
        args.runtime,
        args.workspace,
    )
    dump_json(agreement(result), args.metrics)  # after crosscheck.json, as its summary
    verdict, *details = summary_lines(result)
    for line in [*details, verdict]:  # the verdict last: the stage's summary line repeats it
        logging.getLogger("crosscheck").info(line)


if __name__ == "__main__":
    run_stage(main)
