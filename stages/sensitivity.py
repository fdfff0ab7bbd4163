"""Stage sensitivity: INC mse_v2 (or native) pass -> reports/sensitivity/op_sensitivity.json + metrics.

With ``--scheme NAME`` it is stage scheme_sensitivity: the native pass under that deployment
scheme (``schemes`` block of params.yaml), one DVC stage per scheme."""

from __future__ import annotations

from pathlib import Path

from op_sensitivity.atomic import check_writable
from op_sensitivity.cli import pass_input_parser, run_stage
from op_sensitivity.engines.runner import run_sensitivity, scheme_params
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
    ap.add_argument("--scheme", default=None, help="run the native engine under this scheme instead")
    args = ap.parse_args(argv)
    all_params = load_params(args.params)
    for path in (p for p in (args.out, args.metrics, args.runtime) if p is not None):  # fail now, not after
        check_writable(path, "file")
    params = all_params.sensitivity
    if args.scheme is not None:
        params = scheme_params(params, args.scheme, all_params.schemes)
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
