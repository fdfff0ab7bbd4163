"""INC's pass with the heap frozen (``inc_loop.heap_frozen``) against without: seconds, peak memory,
the same values.

    python benchmarks/inc_gc_freeze.py [--workdir .] [--repeats 2] \\
        --out benchmarks/results/cpu-2026-12-04/inc_gc_freeze_default.json

``--workdir`` holds a finished ``load_model`` and ``prepare_captions`` and its ``params.yaml`` (the
repository after ``make repro``, or the one ``benchmarks/whole_dag.py --until load_model`` leaves).
Each run is one fresh process that loads the inputs the crosscheck stage loads and runs INC's pass
on them, choosing as the stage does: the copy carved from the weights (``crosscheck.carve_*``,
every op of it scored) above ``crosscheck.whole_max_params`` or with ``crosscheck.scope:
carved``, else the whole model. In the ``collected`` runs ``gc.freeze`` is a no-op, so every
per-op collection scans the whole heap, as before the freeze. The two kinds alternate; the ratio
is of the median pass seconds; the peak is the process's resident set (``ru_maxrss``), which must
not grow with the freeze (its per-op collections exist to free each op's model copy). Both kinds
must write the same values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("frozen", "collected")
CHILD = """
import gc, json, resource, sys, time
from dataclasses import replace
from pathlib import Path
workdir, kind, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
if kind == "collected":
    gc.freeze = lambda: None  # every collection walks the whole heap, as before heap_frozen
from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.runner import load_carved_inputs, load_inputs, run_engine
from op_sensitivity.model.source import read_card
from op_sensitivity.params import load_params
from op_sensitivity.report.crosscheck import carved_pass
p = load_params(workdir / "params.yaml")
cal, model_dir = workdir / "data/calibration", workdir / "models/qwen2_5_vl"
check = p.crosscheck
sens = replace(p.sensitivity, native=replace(p.sensitivity.native, requant_mode="cumulative"))
sens = replace(sens, confidence_batches=check.checked_batches(sens.confidence_batches))
carved = check.carves_crosscheck(read_card(model_dir).params)
if carved:
    model, spec, inventory, meta, _ = load_carved_inputs(
        carved_pass(sens), cal, model_dir, check.carve_layers, check.carve_vision_blocks)
else:
    inv = workdir / "reports/model/op_inventory.json"
    model, spec, inventory, meta = load_inputs(sens, cal, model_dir, inv)
result = run_engine("inc", model, spec, out.parent / f"ws_{kind}")
out.write_text(json.dumps(build_report(result, inventory, meta)["phases"], sort_keys=True))
print(json.dumps({"kind": kind, "model": "carved" if carved else "whole", "ops": len(spec.scored),
    "pass_seconds": result.runtime["seconds"],
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_once(workdir: Path, kind: str, scratch: Path) -> tuple[dict, str]:
    """One fresh process: its row and the values it wrote."""
    values = scratch / f"{kind}.json"
    cmd = [sys.executable, "-c", CHILD, str(workdir), kind, str(values)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if out.returncode != 0:
        raise SystemExit(f"the {kind} run failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["seconds"] = round(sum(row.pop("pass_seconds").values()), 2)
    row["peak_rss_gib"] = round(row["peak_rss_gib"], 3)
    return row, values.read_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=REPO)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from op_sensitivity.engines.runner import host_facts

    workdir = args.workdir.resolve()
    scratch = workdir / ".op_sensitivity_work" / "gc_freeze_bench"
    scratch.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    values: dict[str, set[str]] = {kind: set() for kind in KINDS}
    for _ in range(args.repeats):
        for kind in KINDS:
            row, written = run_once(workdir, kind, scratch)
            rows[kind].append(row)
            values[kind].add(written)
            print(f"{kind}: {row['seconds']} s, peak {row['peak_rss_gib']} GiB", flush=True)
    distinct = set().union(*values.values())
    if len(distinct) != 1:
        raise SystemExit(f"the runs wrote {len(distinct)} different sets of values: the freeze changed them")
    median = {kind: statistics.median(r["seconds"] for r in rows[kind]) for kind in KINDS}
    result = {
        "model": rows["frozen"][0]["model"],
        "ops": rows["frozen"][0]["ops"],
        "runs": rows,
        "median_seconds": median,
        "ratio": round(median["collected"] / median["frozen"], 2),
        "peak_rss_gib": {kind: max(r["peak_rss_gib"] for r in rows[kind]) for kind in KINDS},
        "same_values": True,
        "date": datetime.date.today().isoformat(),
        "host": host_facts(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio", "peak_rss_gib")}, indent=2))


if __name__ == "__main__":
    main()
