"""The native engine with its per-call weight copies written into reused buffers
(``engines.weight_copies``) against fresh copies (as before): seconds, peak memory, the same values.

    python benchmarks/weight_copies.py --workdir /tmp/dag3b [--repeats 2] \\
        --out benchmarks/results/cpu-2026-12-04/weight_copies_3b_carved.json

``--workdir`` holds a finished ``load_model`` and ``prepare_captions`` and its ``params.yaml``
(``benchmarks/whole_dag.py --until load_model`` leaves one; at 3B size, the random full-size
model). Each run is one fresh process that loads the model carved as the crosscheck carves it
(``crosscheck.carve_layers`` decoder layers, ``carve_vision_blocks`` vision blocks, every part at
the model's own width) but with the whole vocabulary, so ``lm_head`` is full size, and runs two
native passes on it, every op of the copy scored:

* ``exact``: the crosscheck's native pass (scheme inc_cpu, requant cumulative, no screening);
* ``scheme``: the first deployment scheme of ``schemes.run`` with the params' screening (the
  3b-cpu profile: modelopt_int8, first_order: the autograd sweeps).

Then the plan's forward probe (``plan.probe``, what ``make repro`` prints) for both numerics. In
``fresh`` runs ``WeightCopies._buffer`` gives no buffer, so every copy is a fresh tensor as
before the buffers. The kinds alternate; ratios are of the medians; the peak is the process's
resident set (``ru_maxrss``). Both kinds must write the same values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("buffers", "fresh")
CHILD = """
import json, resource, sys, time
from dataclasses import replace
from pathlib import Path
workdir, kind, scratch = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
if kind == "fresh":
    from op_sensitivity.engines.weight_copies import WeightCopies
    WeightCopies._buffer = lambda *a: None  # every copy a fresh tensor, as before the buffers
from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.runner import load_carved_inputs, run_engine, scheme_params
from op_sensitivity.params import load_params
from op_sensitivity.plan.model import describe
from op_sensitivity.plan.stages import Planner, this_machine
from op_sensitivity.report.crosscheck import carved_pass
p = load_params(workdir / "params.yaml")
cal, model_dir = workdir / "data/calibration", workdir / "models/qwen2_5_vl"
check = p.crosscheck
every = dict(op_name_dict={}, op_type_dict={})
passes = {
    "exact": carved_pass(p.sensitivity),
    "scheme": replace(scheme_params(p.sensitivity, p.schemes.run[0], p.schemes), **every),
}
row, values = {"kind": kind, "scheme": p.schemes.run[0]}, {}
for name, sens in passes.items():
    t = time.perf_counter()
    model, spec, inventory, meta, _ = load_carved_inputs(
        sens, cal, model_dir, check.carve_layers, check.carve_vision_blocks, cut_vocab=False)
    row[f"{name}_load_seconds"] = time.perf_counter() - t
    result = run_engine("native", model, spec, scratch / name)
    row[f"{name}_seconds"] = sum(result.runtime["seconds"].values())
    row[f"{name}_ops"] = len(spec.scored)
    values[name] = build_report(result, inventory, meta)["phases"]
    del model, result
planner = Planner(p, describe(p.model), this_machine())
for name, sens in (("probe_inc_cpu", p.sensitivity), ("probe_scheme", passes["scheme"])):
    costs = planner.forward_costs(sens)
    row[name] = {u: {s: round(1e3 * costs.seconds(s, u, 1), 2) for s in ("int8", "fp32")}
                 for u in ("text_layer", "vision_block", "head")}
row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
(scratch / "values.json").write_text(json.dumps(values, sort_keys=True))
print(json.dumps(row))
"""


def run_once(workdir: Path, kind: str, scratch: Path) -> tuple[dict, str]:
    """One fresh process (a fresh trial log: nothing resumed): its row and the values it wrote."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    cmd = [sys.executable, "-c", CHILD, str(workdir), kind, str(scratch)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if out.returncode != 0:
        raise SystemExit(f"the {kind} run failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, (
        scratch / "values.json"
    ).read_text()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from op_sensitivity.engines.runner import host_facts

    workdir = args.workdir.resolve()
    scratch = workdir / ".op_sensitivity_work" / "weight_copies_bench"
    rows: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    values: set[str] = set()
    for _ in range(args.repeats):
        for kind in KINDS:
            row, written = run_once(workdir, kind, scratch)
            rows[kind].append(row)
            values.add(written)
            print(json.dumps(row), flush=True)
    if len(values) != 1:
        raise SystemExit(f"the runs wrote {len(values)} different sets of values: the buffers changed them")
    median = {
        key: {kind: statistics.median(r[key] for r in rows[kind]) for kind in KINDS}
        for key in ("exact_seconds", "scheme_seconds", "exact_load_seconds")
    }
    result = {
        "runs": rows,
        "median_seconds": median,
        "ratio_fresh_over_buffers": {k: round(v["fresh"] / v["buffers"], 2) for k, v in median.items()},
        "peak_rss_gib": {kind: max(r["peak_rss_gib"] for r in rows[kind]) for kind in KINDS},
        "same_values": True,
        "date": datetime.date.today().isoformat(),
        "host": host_facts(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_fresh_over_buffers", "peak_rss_gib")}))


if __name__ == "__main__":
    main()
