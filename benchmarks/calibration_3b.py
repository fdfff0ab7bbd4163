"""A batch's calibration at full 3B size (random weights): packing the int8 weights once against
packing them on every calibration, side by side in one run.

    python benchmarks/calibration_3b.py --out benchmarks/results/calibration_3b.json

The model, params and calibration records are ``first_order_3b.py``'s (the published 3B
architecture with seeded random bf16 weights, built into ``--work`` when absent; profiles/3b-cpu.yaml;
native, cpu, float32, int8 kernels; the repo's ``data/calibration`` thumbnails), with 2 confidence
batches. On one ``engines.native._PassLoop``, timed:

1. ``cold``: batch 0's calibration, the first: every op's int8 weight is packed;
2. ``kept``: batch 1's calibration, the packed weights kept (``FakeQuantModel._int8_module``);
3. ``repacked``: batch 1's calibration again after the packed modules are dropped, as every
   calibration did before: every weight packed again.

Between 2 and 3 the float32 reference and an all-int8 forward must be identical to the bit (the
script fails otherwise). ``--model default`` runs the same on the embedded default's sizes in
seconds (a check of the script, not a figure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import first_order_3b as fo3b  # noqa: E402


def timed_calibration(loop, b: int) -> tuple[float, torch.Tensor, float]:
    """Seconds, the float32 reference, and the peak RSS (GiB) so far."""
    raw = loop.spec.batches[b]
    start = time.perf_counter()
    ref = loop.calibrate(b, loop.num.batch(raw))
    return time.perf_counter() - start, ref, fo3b.rss_now()["vm_hwm_gib"]


def all_int8(loop, b: int) -> torch.Tensor:
    loop.fq.set_all(True)
    with torch.no_grad():
        out = loop.forward(loop.num.batch(loop.spec.batches[b]))
    loop.fq.set_all(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="3b", choices=("3b", "default"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/calibration_3b.json")
    ap.add_argument("--work", default="/tmp/fo3b", help="the 3B's model dir (reused when present)")
    args = ap.parse_args()
    os.chdir(REPO)
    work = Path(args.work) if args.model == "3b" else Path(tempfile.mkdtemp(prefix="cal3b_small_"))
    if args.model == "3b":
        params = fo3b.profile_params(work, 2)
        model_dir, inv, built = fo3b.build_3b(params, work)
        sens, cal = params.sensitivity, fo3b.CALIBRATION
    else:
        import first_order_agreement as agree

        repo_params = fo3b.load_params(REPO / "params.yaml")
        cal = agree.calibration(repo_params, work, 2)
        model_dir = agree.build_model("default", repo_params, cal, work)
        sens, inv, built = agree.pass_params(2), model_dir.parent / "op_inventory.json", None
    loop, loaded, meta = fo3b.open_loop(sens, cal, model_dir, inv)
    steps: dict[str, Any] = {}
    try:
        for name, b in (("cold", 0), ("kept", 1)):
            seconds, ref, peak = timed_calibration(loop, b)
            steps[name] = {"seconds": round(seconds, 2), "peak_rss_gib": peak}
            print(f"{name}: {seconds:.1f} s", flush=True)
        kept_ref, kept_int8 = ref, all_int8(loop, 1)
        for op in loop.fq.ops.values():
            op.qmodule = None
        seconds, ref, peak = timed_calibration(loop, 1)
        steps["repacked"] = {"seconds": round(seconds, 2), "peak_rss_gib": peak}
        print(f"repacked: {seconds:.1f} s", flush=True)
        if not (torch.equal(ref, kept_ref) and torch.equal(all_int8(loop, 1), kept_int8)):
            raise SystemExit("the kept and repacked calibrations differ: the cache is wrong")
    finally:
        loop.close()
    doc = {
        "model": args.model,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/calibration_3b.py", *sys.argv[1:]]),
        "machine": fo3b.machine(),
        "load_average": os.getloadavg(),
        "model_card": {k: meta["model"][k] for k in ("source", "params") if k in meta["model"]},
        "model_dir": {"path": str(model_dir), "built_seconds": built, "load_seconds": round(loaded, 1)},
        "ops": len(loop.scored),
        "steps": steps,
        "identical": True,
        "kept_over_repacked": round(steps["kept"]["seconds"] / steps["repacked"]["seconds"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["steps"]), doc["kept_over_repacked"])


if __name__ == "__main__":
    main()
