"""sensitivity.native.processes on the CPU: 1 against 2 processes, side by side, same bytes?

    python benchmarks/processes.py --out benchmarks/results/cpu-2026-11-27/processes.json

Runs the sensitivity stage (native engine) on the repo's own embedded-default run (data/calibration,
models/qwen2_5_vl: `make repro` first) with ``processes: 1`` and ``2``, alternating, ``--repeats``
times each; records the stage's wall seconds and checks that both give the same
op_sensitivity.json bytes. Why: docs/engines.md says what the processes cost on a CPU and that
they give the values of one process; this is where those figures come from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from op_sensitivity.engines.runner import host_facts

REPO = Path(__file__).resolve().parents[1]


def run_stage(params: dict, processes: int, work: Path) -> tuple[float, str]:
    params = json.loads(json.dumps(params))
    params["sensitivity"].update(engine="native")
    params["sensitivity"]["native"]["processes"] = processes
    out = work / f"p{processes}"
    out.mkdir(exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cmd = [
        sys.executable,
        str(REPO / "stages/sensitivity.py"),
        "--params",
        str(out / "params.yaml"),
        "--out",
        str(out / "op_sensitivity.json"),
        "--metrics",
        str(out / "metrics.json"),
        "--workspace",
        str(out / "ws"),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    subprocess.run(["rm", "-rf", str(out / "ws")], check=True)  # no resume from the previous repeat
    return seconds, hashlib.sha256((out / "op_sensitivity.json").read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    seconds: dict[int, list[float]] = {1: [], 2: []}
    digests: dict[int, set[str]] = {1: set(), 2: set()}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for n in (1, 2):
                s, digest = run_stage(params, n, Path(tmp))
                seconds[n].append(round(s, 2))
                digests[n].add(digest)
                print(f"processes {n}: {s:.1f} s", flush=True)
    same = len(digests[1] | digests[2]) == 1
    doc = {
        "what": "sensitivity stage, native engine, embedded default (params.yaml), processes 1 vs 2",
        "host": host_facts(),
        "seconds": {str(n): v for n, v in seconds.items()},
        "median_seconds": {str(n): statistics.median(v) for n, v in seconds.items()},
        "ratio_2_over_1": round(statistics.median(seconds[2]) / statistics.median(seconds[1]), 2),
        "same_bytes": same,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    if not same:
        raise SystemExit("processes 1 and 2 gave different op_sensitivity.json bytes")


if __name__ == "__main__":
    main()
