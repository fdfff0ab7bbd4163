"""Stage rank_report: op_sensitivity.json -> reports/op_sensitivity.md, PNG plots, scores and a summary."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from op_sensitivity.atomic import dump_json
from op_sensitivity.cli import run_stage
from op_sensitivity.engines.artifact import read_report, scheme_name
from op_sensitivity.inventory import read_inventory
from op_sensitivity.params import load_params
from op_sensitivity.phases import FALLBACK
from op_sensitivity.report.comparison import read_crosscheck
from op_sensitivity.report.deployment import read_deployments
from op_sensitivity.report.deployment import section as deployment_section
from op_sensitivity.report.rank import read_section, write_rank_report
from op_sensitivity.report.schemes import compare_schemes, read_spectra, render_section, scheme_summary
from op_sensitivity.report.stability import read_chosen_list, stability, write_stability
from op_sensitivity.report.stability import render_section as stability_section


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--sensitivity", default="reports/sensitivity/op_sensitivity.json", type=Path)
    ap.add_argument("--inventory", default="reports/model/op_inventory.json", type=Path)
    ap.add_argument(
        "--crosscheck", default=None, type=Path, help="crosscheck.json to summarise in the report"
    )
    ap.add_argument(
        "--validation",
        default=None,
        type=Path,
        help="the validate stage's section.md, appended to the report",
    )
    ap.add_argument(
        "--schemes-dir",
        default=None,
        type=Path,
        help="stage scheme_sensitivity's reports (<dir>/<scheme>/op_sensitivity.json) to compare",
    )
    ap.add_argument(
        "--keep-list",
        default="reports/fallback/fallback_ops.json",
        type=Path,
        help="the fallback_list stage's fallback_ops.json: how stable its choice is",
    )
    ap.add_argument(
        "--quantize-dir",
        default=None,
        type=Path,
        help="stage quantize's documents (<dir>/<target>.json): the Deployment section",
    )
    ap.add_argument("--out-dir", default="reports", type=Path)
    args = ap.parse_args(argv)
    all_params = load_params(args.params)
    params = all_params.report
    check = read_crosscheck(args.crosscheck) if args.crosscheck else None
    report, inventory = read_report(args.sensitivity), read_inventory(args.inventory)
    stable = stability(report, inventory, read_chosen_list(args.keep_list))
    sections, extra_summary = [], {}
    if args.schemes_dir is not None and all_params.schemes.run:
        main = scheme_name(report)
        matrix = read_spectra(args.schemes_dir, list(all_params.schemes.run))
        spectra = {main: report, **{(n if n != main else f"{n} (native)"): r for n, r in matrix.items()}}
        doc = compare_schemes(spectra, inventory)
        dump_json(doc, args.out_dir / "rank" / "schemes.json")
        sections.append(render_section(doc))
        extra_summary["schemes"] = scheme_summary(doc)
    sections.append(stability_section(stable))
    if args.validation:
        sections.append(read_section(args.validation))
    if args.quantize_dir is not None and all_params.quantize.targets:
        sections.append(deployment_section(read_deployments(args.quantize_dir, all_params.quantize.targets)))
    m = write_rank_report(report, inventory, args.out_dir, params, check, sections, extra_summary)
    write_stability(stable, args.out_dir)
    logging.getLogger("rank_report").info(
        "report written to %s: spearman %.3f, most sensitive %s; stability: %s",
        args.out_dir / "op_sensitivity.md",
        m["phase_spearman"],
        m[FALLBACK]["most_sensitive"],
        stable["verdict"],
    )


if __name__ == "__main__":
    run_stage(main)
