"""Stage validate: the chosen keep-list on the test split, against random lists and INC's own PTQ
(of the whole model, or of a carved copy above ``crosscheck.whole_max_params``: ``validation.inc_check``),
and the ops each ranking needs on the test split. It never reads the selection split."""

from __future__ import annotations

import logging
from pathlib import Path

from op_sensitivity.atomic import atomic_file, dump_json
from op_sensitivity.cli import pass_input_parser, run_stage
from op_sensitivity.engines.artifact import read_report
from op_sensitivity.errors import InputError
from op_sensitivity.fallback.exports import inc_op_name_dict
from op_sensitivity.fallback.keep_list import check_keep_list_ops, read_keep_list
from op_sensitivity.inventory import read_inventory
from op_sensitivity.model.source import load_model_dir, read_card
from op_sensitivity.params import load_params
from op_sensitivity.validation.curve import read_curve
from op_sensitivity.validation.inc_check import carved_check, whole_check
from op_sensitivity.validation.inputs import open_measurer, scored_and_excluded
from op_sensitivity.validation.measure import TEST
from op_sensitivity.validation.plots import pareto
from op_sensitivity.validation.validate import metrics, rankings_metrics, section, validate_keep_list


def main(argv: list[str] | None = None) -> None:
    ap = pass_input_parser(__doc__)
    ap.add_argument(
        "--test", default="data/test", type=Path, help="the held-out test split (prepare_captions)"
    )
    ap.add_argument("--sensitivity", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--keep-list", default="reports/fallback/fallback_ops.json", type=Path)
    ap.add_argument("--curve", default="reports/validation/curve.json", type=Path)
    ap.add_argument("--out-dir", default="reports/validation", type=Path)
    ap.add_argument(
        "--rankings-dir",
        default="reports/rankings",
        type=Path,
        help="one DVC metrics file per row of the rankings table (n50, n90, n99)",
    )
    ap.add_argument("--workspace", default=".op_sensitivity_work/validate", type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params)
    report, curve = read_report(args.sensitivity), read_curve(args.curve)
    keep_list, inventory = read_keep_list(args.keep_list), read_inventory(args.inventory)
    scored, excluded = scored_and_excluded(report)
    check_keep_list_ops(keep_list, args.keep_list, scored, args.sensitivity)
    if curve["ops"] != scored:
        raise InputError(
            f"{args.curve}: its ops are not the ops {args.sensitivity} scored (rerun the curve stage)"
        )
    keep = [o["module"] for o in keep_list["ops"]]
    card, check, batch_size = read_card(args.model), params.crosscheck, params.curve.batch_size
    carved = params.validate.inc_check and check.carves(card.params)
    with open_measurer(
        params.sensitivity, batch_size, args.calibration, args.test, args.model, report, TEST
    ) as measurer:
        doc = validate_keep_list(measurer, keep, excluded, inventory, params.curve, curve)
        if params.validate.inc_check and not carved:
            model, _, _ = load_model_dir(args.model)
            # the keep-list, and what the sensitivity params kept fp32 (the native model keeps it too)
            fp32_ops = [*keep, *excluded]
            whole_check(
                doc, measurer, model, fp32_ops, inc_op_name_dict, batch_size, args.workspace, report, check
            )
    del measurer
    if carved:  # after the full model is released: only the carved copy is in memory
        dirs = {"calibration": args.calibration, "test": args.test, "model": args.model}
        carved_check(
            doc, keep, inc_op_name_dict, params.sensitivity, check, batch_size, dirs, report, args.workspace
        )
    out = args.out_dir
    dump_json(doc, out / "validation.json")
    with atomic_file(out / "section.md") as tmp:
        chosen_by = keep_list["policy"].get("reason")
        tmp.write_text(section(doc, curve, keep_list.get("groups_widened"), chosen_by))
    with atomic_file(out / "pareto.png") as tmp:
        pareto(curve, doc, tmp)
    dump_json(metrics(doc), out / "metrics.json")
    for name, row in rankings_metrics(doc, params.curve.crossings).items():
        dump_json(row, args.rankings_dir / f"{name}.json")
    m = doc["metric"]
    random = f"{doc['random']['recovered'][m]['mean']:.1%}" if doc["random"] else "none drawn"
    logging.getLogger("validate").info(
        "the keep-list (%d ops) gives back %.1f%% of all-int8's %s damage on the test split (random lists "
        "of its size: %s)",
        len(keep),
        100 * doc["chosen"]["recovered"][m],
        m,
        random,
    )


if __name__ == "__main__":
    run_stage(main)
