"""Validate params.yaml and the paths it names, then print the plan, before `dvc repro` touches anything.

    python scripts/check_params.py [params.yaml] [--all] [--no-probe]

Why before DVC: the DAG's first stage (check_params) makes the same input check, but a stage
that cannot fit this machine (INC on a 3B in 24 GB, a CUDA device that is absent) fails after
hours of the stages before it. `make repro`
runs this first: it prints, per stage DVC will run, what it will do, on which device, and the
expected time and peak memory where this machine can tell (``op_sensitivity.plan``), then exits
2 with one line naming the param to change when something cannot run, 0 otherwise.

--all plans every stage (default: the stages `dvc repro` would run, read from DVC); --no-probe
skips the few-second forward probe (no time estimates but from this machine's runtime files).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from op_sensitivity import logs
from op_sensitivity.cli import run_stage
from op_sensitivity.params import load_params
from op_sensitivity.plan.model import describe
from op_sensitivity.plan.pending import all_stages, stages_to_run
from op_sensitivity.plan.stages import build_plan, check
from op_sensitivity.preflight.inputs import check_inputs

MODEL_DIR = Path("models/qwen2_5_vl")  # load_model's output (dvc.yaml)
DVC_YAML = Path(__file__).resolve().parents[1] / "dvc.yaml"  # this project's pipeline
RUNTIME_DIR = Path("reports/runtime")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", nargs="?", default="params.yaml", type=Path)
    ap.add_argument("--all", action="store_true", help="plan every stage, not only those DVC would run")
    ap.add_argument("--no-probe", action="store_true", help="no forward probe")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # torch's deprecations, from the probe
    p = load_params(args.params)
    check_inputs(p)  # the check_params stage's own check
    out = logs.terminal_out()  # the plan is this project's output; libraries' prints go to the log
    print(f"{args.params}: ok (model source {p.model.source}, engine {p.sensitivity.engine})", file=out)
    # what DVC would run applies to the project's own params.yaml; another file: a run from scratch
    ours = args.params.resolve() == Path("params.yaml").resolve()
    stages = None if args.all or not ours else stages_to_run(Path.cwd())
    stages = all_stages(p.schemes.run, DVC_YAML, p.quantize.targets) if stages is None else stages
    up_to_date = "load_model" not in stages and (MODEL_DIR / "config.json").is_file()
    facts = describe(p.model, MODEL_DIR if up_to_date else None)
    plan = build_plan(p, facts, stages, runtime_dir=RUNTIME_DIR, probe_forward=not args.no_probe)
    print("\n".join(plan.lines()), file=out, flush=True)
    check(plan)


if __name__ == "__main__":
    run_stage(main)
