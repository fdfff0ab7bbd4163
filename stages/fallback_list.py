"""Stage fallback_list: ranked spectrum + fallback policy -> reports/fallback/ (canonical list + exports).

``measured_budget`` measures the lists it would ship on the selection split (the model, the
calibration sample and the selection split are read only for it)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from op_sensitivity.atomic import check_writable
from op_sensitivity.cli import pass_input_parser, run_stage
from op_sensitivity.engines.artifact import read_report
from op_sensitivity.fallback.exports import onnx_graph
from op_sensitivity.fallback.keep_list import build_fallback, scheme_fallbacks, write_fallback
from op_sensitivity.fallback.policy import MEASURED_POLICIES
from op_sensitivity.inventory import read_inventory
from op_sensitivity.params import load_params
from op_sensitivity.report.schemes import read_spectra, scheme_report_path
from op_sensitivity.validation.curve import read_curve
from op_sensitivity.validation.inputs import open_measurer


def main(argv: list[str] | None = None) -> None:
    ap = pass_input_parser(__doc__)
    ap.add_argument(
        "--selection", default="data/selection", type=Path, help="the split the choice is made on"
    )
    ap.add_argument("--sensitivity", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--out-dir", default="reports/fallback", type=Path)
    ap.add_argument("--metrics", default="reports/fallback_metrics.json", type=Path)
    ap.add_argument(
        "--curve", default="reports/validation/curve.json", type=Path, help="read by the measured policies"
    )
    ap.add_argument(
        "--schemes-dir",
        default=None,
        type=Path,
        help="stage scheme_sensitivity's reports: each tool's export is built from its own scheme's",
    )
    ap.add_argument(
        "--quantized-dir",
        default=None,
        type=Path,
        help="stage quantize's artifacts (exports.json points at them)",
    )
    ap.add_argument("--quantize-docs", default=None, type=Path, help="stage quantize's measured documents")
    args = ap.parse_args(argv)
    all_params = load_params(args.params)
    check_writable(args.out_dir, "dir")  # a path in the way fails now, not after the measured walk
    check_writable(args.metrics, "file")
    params = all_params.fallback
    graph = onnx_graph(params.onnx_model, params.where("onnx_model"))
    inventory = read_inventory(args.inventory)
    measured = params.policy in MEASURED_POLICIES
    curve = read_curve(args.curve) if measured else None
    report = read_report(args.sensitivity)
    with contextlib.ExitStack() as stack:
        measure = None
        if params.policy == "measured_budget":
            measurer = stack.enter_context(
                open_measurer(
                    all_params.sensitivity,
                    all_params.curve.batch_size,
                    args.calibration,
                    args.selection,
                    args.model,
                    report,
                )
            )
            measure = measurer.measure
        doc = build_fallback(
            report, args.sensitivity, inventory, params, curve, args.curve if measured else None, measure
        )
    scheme_docs = {}
    if args.schemes_dir is not None and all_params.schemes.run:
        names = list(all_params.schemes.run)
        spectra = read_spectra(args.schemes_dir, names)
        paths = {n: (spectra[n], scheme_report_path(args.schemes_dir, n)) for n in names}
        scheme_docs = scheme_fallbacks(doc, paths, inventory, params)
    deploy = (args.quantized_dir, args.quantize_docs) if args.quantized_dir and args.quantize_docs else None
    write_fallback(
        doc, inventory, graph, args.out_dir, args.metrics, scheme_docs, params.where("onnx_model"), deploy
    )
    kept = [o["module"] for o in doc["ops"]]
    logging.getLogger("fallback_list").info(
        "%s on the %s ranking: keep %d of %d ops in high precision (%s) -> %s",
        params.policy,
        params.phase,
        len(kept),
        doc["totals"]["ops_scored"],
        ", ".join(kept) if len(kept) <= 3 else f"{', '.join(kept[:3])}, ...",
        args.out_dir,
    )


if __name__ == "__main__":
    run_stage(main)
