"""Stage curve: each ranking's top-n keep-lists measured on the selection split -> reports/validation/curve.*

The measured keep-list policies choose from these numbers; validate never reads this split."""

from __future__ import annotations

import logging
from pathlib import Path

from op_sensitivity.cli import pass_input_parser, run_stage
from op_sensitivity.engines.artifact import read_report
from op_sensitivity.inventory import read_inventory
from op_sensitivity.params import load_params
from op_sensitivity.report.scores import phase_scores
from op_sensitivity.validation.curve import measure_curve, write_curve
from op_sensitivity.validation.inputs import open_measurer, scored_and_excluded
from op_sensitivity.validation.measure import SELECTION


def main(argv: list[str] | None = None) -> None:
    ap = pass_input_parser(__doc__)
    ap.add_argument(
        "--selection",
        default="data/selection",
        type=Path,
        help="the held-out selection split (prepare_captions): the measured keep-list policies choose on it",
    )
    ap.add_argument("--sensitivity", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--out", default="reports/validation/curve.json", type=Path)
    ap.add_argument("--csv", default="reports/validation/curve.csv", type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    report = read_report(args.sensitivity)
    inventory = read_inventory(args.inventory)
    rankings = {phase: list(df["module"]) for phase, df in phase_scores(report, inventory).items()}
    _, excluded = scored_and_excluded(report)
    with open_measurer(
        params.sensitivity,
        params.curve.batch_size,
        args.calibration,
        args.selection,
        args.model,
        report,
        SELECTION,
    ) as measurer:
        doc = measure_curve(measurer, rankings, excluded, inventory, params.curve)
    write_curve(doc, args.out, args.csv)
    logging.getLogger("curve").info(
        "%d ops, %d curve points, %d random lists -> %s (the table: %s)",
        len(doc["ops"]),
        len(doc["points"]),
        sum(r["lists"] for r in doc["random"]),
        args.out,
        args.csv,
    )


if __name__ == "__main__":
    run_stage(main)
