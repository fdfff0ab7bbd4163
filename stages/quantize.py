"""Stage quantize (one per target, ``foreach`` over ``quantize.targets``): the target's deployable
artifact from the keep-list chosen on its scheme's spectrum, measured in the runtime that loads it
(``op_sensitivity.quantize``).

Everything is built in a staging directory beside ``--out`` and the artifact, the document and the
metrics are renamed into place together at the end (``quantize.deploy``, Commit). ``$TMPDIR`` points
into that directory before the tools are imported: ONNX Runtime writes its telemetry session file
``.ses`` there at import, torch its inductor cache directory, ORT's ``quantize_static`` its
scratch; nothing is left in the system's temporary directory, even by a killed run (the next run
of the target removes a dead run's staging directory).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from op_sensitivity.atomic import private_tmp, staging
from op_sensitivity.cli import pass_input_parser, run_stage
from op_sensitivity.params import TARGET_SCHEMES


def parser() -> argparse.ArgumentParser:
    ap = pass_input_parser(__doc__)
    ap.add_argument("--target", required=True, choices=sorted(TARGET_SCHEMES))
    ap.add_argument("--test", default="data/test", type=Path, help="the held-out test split")
    ap.add_argument("--fallback-dir", default="reports/fallback", type=Path)
    ap.add_argument("--schemes-dir", default="reports/schemes", type=Path)
    ap.add_argument(
        "--sensitivity",
        default="reports/sensitivity/op_sensitivity.json",
        type=Path,
        help="the main pass's report (the spectrum of targets deployed from the main pass: inc)",
    )
    ap.add_argument("--out", required=True, type=Path, help="the artifact (a directory)")
    ap.add_argument("--doc", required=True, type=Path, help="the measured document (JSON)")
    ap.add_argument("--metrics", required=True, type=Path)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with staging(args.out) as stage, private_tmp(stage / "tmp"):
        deploy(args, stage)


def deploy(args: argparse.Namespace, stage: Path) -> None:
    """The stage's work, inside its staging directory. The libraries are imported here, after
    ``$TMPDIR`` is pointed into it: importing torch's compiler stack and ONNX Runtime writes there."""
    from op_sensitivity.engines.artifact import read_report
    from op_sensitivity.fallback.keep_list import read_keep_list
    from op_sensitivity.inventory import read_inventory
    from op_sensitivity.params import MAIN_PASS_TARGETS, load_params
    from op_sensitivity.quantize.deploy import SCHEME, keep_list_path, quantize_target
    from op_sensitivity.report.schemes import scheme_report_path

    params = load_params(args.params)
    keep_path = keep_list_path(args.fallback_dir, args.target)
    main_pass = args.target in MAIN_PASS_TARGETS
    spectrum = args.sensitivity if main_pass else scheme_report_path(args.schemes_dir, SCHEME[args.target])
    keep_list, report = read_keep_list(keep_path), read_report(spectrum)
    dirs = {
        "model": args.model,
        "calibration": args.calibration,
        "test": args.test,
        "keep_list": keep_path,
        "spectrum": spectrum,
    }
    inventory = read_inventory(args.inventory)
    quantize_target(
        args.target, params, dirs, keep_list, report, inventory, args.out, args.doc, args.metrics, stage
    )


if __name__ == "__main__":
    run_stage(main)
