"""Stage check_params: params.yaml and the paths it names, checked before any other stage runs.

Its output is the same few bytes whenever the check passes, so a param change reruns this
check but nothing downstream of it; a bad value stops ``dvc repro`` here, before DVC deletes
another stage's outputs (``op_sensitivity.plan.inputs``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from op_sensitivity.atomic import dump_json
from op_sensitivity.cli import run_stage
from op_sensitivity.params import load_params
from op_sensitivity.preflight.inputs import check_inputs

CHECKED = {"checked": "params.yaml and the paths it names (stage check_params)"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/params_check.json", type=Path)
    args = ap.parse_args(argv)
    check_inputs(load_params(args.params))
    dump_json(CHECKED, args.out)


if __name__ == "__main__":
    run_stage(main)
