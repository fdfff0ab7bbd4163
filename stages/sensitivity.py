"""Stage sensitivity: INC mse_v2 (or native) pass -> reports/sensitivity/op_sensitivity.json + metrics."""

from __future__ import annotations

from pathlib import Path

from op_sensitivity.cli import pass_input_parser, run_stage
from op_sensitivity.engines.runner import run_sensitivity
from op_sensitivity.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = pass_input_parser(__doc__)
    ap.add_argument("--out", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--metrics", default="reports/sensitivity/metrics.json", type=Path)
    ap.add_argument(
        "--runtime",
        default=None,
        type=Path,
        help="seconds, peak memory and host facts: a DVC metric no stage hashes",
    )
    ap.add_argument(
        "--workspace",
        default=".op_sensitivity_work",
        type=Path,
        help="INC workspace and partial results (not a pipeline output)",
    )
    args = ap.parse_args(argv)
    params = load_params(args.params).sensitivity
    run_sensitivity(
        params,
        args.calibration,
        args.model,
        args.inventory,
        args.out,
        args.metrics,
        args.runtime,
        args.workspace,
    )


if __name__ == "__main__":
    run_stage(main)
