"""INC and the native engine on a carved copy at real width: seconds and peak memory, side by side.

    python benchmarks/carved_crosscheck.py --workdir /tmp/dag3b --vocab cut,full \\
        --out benchmarks/results/cpu-2026-11-27/carved_crosscheck_3b.json

``--workdir`` holds a finished ``load_model`` and ``prepare_captions`` (e.g. the one
``benchmarks/whole_dag.py`` leaves) and its ``params.yaml``. For each vocabulary mode (``cut``:
the rows the calibration batches use, what the crosscheck stage does; ``full``: all rows) and
each engine, one fresh process loads the carved copy (``crosscheck.carve_*`` of the params) and
runs the pass of the crosscheck stage on it (every op, the pass's confidence batches and
numerics), so each peak resident set is that engine's alone (``ru_maxrss`` of the process; the
weights are memory-mapped until used). The native and INC reports of each mode are compared as
the stage compares them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.runner import load_carved_inputs, run_engine
from op_sensitivity.params import load_params
from op_sensitivity.report.crosscheck import carved_pass
workdir, engine, vocab, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
p = load_params(workdir / "params.yaml")
sens = carved_pass(p.sensitivity)
start = time.perf_counter()
model, spec, inventory, meta, carve = load_carved_inputs(
    sens, workdir / "data/calibration", workdir / "models/qwen2_5_vl",
    p.crosscheck.carve_layers, p.crosscheck.carve_vision_blocks, cut_vocab=vocab == "cut")
loaded = time.perf_counter() - start
result = run_engine(engine, model, spec, out.parent / f"ws_{engine}_{vocab}")
out.write_text(json.dumps(build_report(result, inventory, meta)))
print(json.dumps({"engine": engine, "vocab": vocab, "carve": carve.as_dict(), "ops": len(spec.scored),
    "load_seconds": loaded, "pass_seconds": result.runtime["seconds"],
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--vocab", default="cut,full")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from op_sensitivity.engines.runner import host_facts
    from op_sensitivity.report.comparison import crosscheck

    scratch = args.workdir / ".carved_bench"
    scratch.mkdir(exist_ok=True)
    rows, agreement = [], {}
    for vocab in args.vocab.split(","):
        reports = {}
        for engine in ("native", "inc"):
            report = scratch / f"{engine}_{vocab}.json"
            cmd = [sys.executable, "-c", CHILD, str(args.workdir), engine, vocab, str(report)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            reports[engine] = json.loads(report.read_text())
            seconds = sum(row["pass_seconds"].values())
            print(f"{vocab} {engine}: {seconds:.1f} s, peak {row['peak_rss_gib']:.2f} GiB", flush=True)
        doc = crosscheck(reports["native"], reports["inc"])
        agreement[vocab] = {
            phase: {k: v[k] for k in ("ops", "spearman", "median_rel_diff", "max_rel_diff")}
            for phase, v in doc["phases"].items()
        }
    result = {"rows": rows, "agreement": agreement, "host": host_facts()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(agreement, indent=2))


if __name__ == "__main__":
    main()
