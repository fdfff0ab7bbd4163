"""Wall time of every DAG stage, run one after another as `dvc repro` runs them, in one process tree.

    python benchmarks/stage_costs.py [--stages curve,validate] [--out stage_costs.json]

Runs each stage's own ``cmd`` from ``dvc.yaml`` (interpreter start and imports included, as under
DVC) on the workspace's current inputs, after a ``make repro`` has produced them, and prints a
table: seconds per stage, the share of the whole DAG, and the total. It answers "what does a
stage add to ``make repro``", side by side with the stages it sits beside. Outputs are
rewritten with the same bytes (the stages are deterministic); timings go to ``--out`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from op_sensitivity.engines.runner import host_facts

REPO = Path(__file__).resolve().parents[1]


def stage_commands() -> dict[str, str]:
    """Every stage's command; a ``foreach`` stage once per item of its params list, named as DVC
    names it (``quantize@inc``)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            out[name] = " ".join(stage["cmd"].split())
            continue
        block, key = stage["foreach"].strip("${}").split(".")
        for item in params[block][key]:
            out[f"{name}@{item}"] = " ".join(stage["do"]["cmd"].replace("${item}", item).split())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=None, help="comma-separated subset (default: every stage)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    commands = stage_commands()
    chosen = args.stages.split(",") if args.stages else list(commands)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    seconds = {}
    for name in chosen:
        start = time.perf_counter()
        subprocess.run(commands[name], shell=True, cwd=REPO, env=env, check=True, capture_output=True)
        seconds[name] = round(time.perf_counter() - start, 2)
        print(f"{name}: {seconds[name]} s", flush=True)
    total = sum(seconds.values())
    h = host_facts()
    print(f"\nmachine: {h['cpu']}, {h['cpu_count']} cores, {h['torch_threads']} torch threads")
    print("| stage | s | share |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s} | {s / total:.0%} |")
    print(f"| total | {round(total, 2)} | 100% |")
    if args.out:
        args.out.write_text(json.dumps({"host": h, "seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
