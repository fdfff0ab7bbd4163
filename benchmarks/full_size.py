"""A full-size native pass, sampled: real memory, measured per-trial seconds, projected spectrum time.

    python benchmarks/full_size.py                        # 3B, one 448x448 sample, CPU
    python benchmarks/full_size.py --size 7b --device cuda --batch 4 --out full_size_7b.json

A full spectrum of the 3B on 2 CPU cores takes hours, so this runs the engine's own pass over
every op of the full-size architecture (seeded random bf16 weights, as the published checkpoint
stores them) but measures only a few trials: the engine skips trials it finds in its trial log
(that is how a killed pass resumes), and this script pre-fills the log with placeholder values
for every trial except the sampled ones. Everything else is the real pass: every op calibrated
with its observers, every op's int8 weights held, the all-int8 trial, the vision-output cache.
So the peak memory is a full pass's, and the seconds of a sampled trial are what that trial
costs inside a full pass. The values are discarded (the weights are random).

Sampled: ``--vision-ops`` vision ops and ``--text-ops`` text ops, evenly spaced in module
order; one pass per ``--suffix-reuse`` setting on the same model build (side by side). A vision
trial recomputes the vision tower; a text trial reuses its cached output, except the first
sampled text trial of a phase (the vision state changed), which is reported but left out of
the projection. Without suffix reuse a trial costs the same wherever its op is (the median of
the samples); with it, a trial recomputes from its op's block onward, so the samples are fitted
with a line in the block index. Projection, labelled as such:

    per confidence batch = calibration + all-int8 trial
                           + sum over phases and ops (the op's projected trial seconds)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from engines import _machine, full_size_inputs  # this directory is on sys.path when run as a script

from op_sensitivity.engines.contract import build_spec
from op_sensitivity.engines.memory import current_rss_gib
from op_sensitivity.engines.native import run_pass
from op_sensitivity.engines.numerics import resolve_numerics
from op_sensitivity.engines.trial_log import TRIAL_LOG, TrialLog, pass_fingerprint
from op_sensitivity.params import load_params
from op_sensitivity.phases import FALLBACK, REQUANT


def evenly(names: list[str], k: int) -> list[str]:
    """``k`` names spread over the list (its middle for one)."""
    if k >= len(names):
        return list(names)
    return [names[round((i + 0.5) * len(names) / k - 0.5)] for i in range(k)]


def prefill(path: Path, fingerprint: str, scored: list[str], sampled: set[str]) -> None:
    """A trial log that says every trial but the sampled ones (and the all-int8 one) is done."""
    path.unlink(missing_ok=True)
    trials = TrialLog(path, fingerprint)
    for phase in (FALLBACK, REQUANT):
        for name in scored:
            if name not in sampled:
                trials.put((phase, 0, name), 0.0)
    trials.close()


def positions(names: list[str]) -> dict[str, int]:
    """Each op's block index in its stack; -1 before the stack (embedding, patch embed), the stack's
    length after it (merger, lm_head): what a trial with suffix reuse recomputes from."""
    pos, seen = {}, []
    for name in names:
        m = re.search(r"\.(?:layers|blocks)\.(\d+)\.", name)
        if m:
            seen.append(int(m.group(1)))
        pos[name] = int(m.group(1)) if m else (max(seen) + 1 if seen else -1)
    return pos


def fit(points: list[tuple[int, float]]) -> Callable[[int], float]:
    """Seconds per trial as a line in the block index (a constant with one distinct index)."""
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        mean = statistics.fmean(t for _, t in points)
        return lambda _x: mean
    slope, intercept = np.polyfit(xs, [t for _, t in points], 1)
    return lambda x: float(intercept + slope * x)


def sampled_pass(model, spec, sampled: set[str], towers: dict[str, str], workspace: Path) -> dict:
    """One pass measuring only ``sampled`` trials (and the all-int8 one), projected to every op."""
    scored = [name for name, _ in spec.scored]
    prefill(workspace / TRIAL_LOG, pass_fingerprint(spec, resolve_numerics(spec.params)), scored, sampled)
    result = run_pass(model, spec, workspace=workspace)
    rt, times = result.runtime, result.runtime["trial_seconds"]
    pos = {**positions([n for n in scored if towers[n] == "vision"])}
    pos.update(positions([n for n in scored if towers[n] != "vision"]))
    first_text = next(n for n in scored if n in sampled and towers[n] != "vision")
    per_phase = {}
    for phase in (FALLBACK, REQUANT):
        phase_s = 0.0
        for tower in ("vision", "text"):
            ops = [n for n in scored if (towers[n] == "vision") == (tower == "vision")]
            # the first text trial of a phase also recomputes the vision tower (its state changed)
            points = [(pos[n], times[phase][n]) for n in ops if n in sampled and n != first_text]
            line = (
                fit(points)
                if spec.params.native.suffix_reuse
                else (lambda _x, p=points: statistics.median(t for _, t in p))
            )
            phase_s += sum(line(pos[n]) for n in ops)
        per_phase[phase] = phase_s
    fixed = rt["calibration_seconds"][0] + times["all_int8"][""]
    per_batch = fixed + sum(per_phase.values())
    return {
        "suffix_reuse": spec.params.native.suffix_reuse,
        "sampled_trials_s": {
            p: {n: {"block": pos[n], "s": round(times[p][n], 3)} for n in scored if n in sampled}
            for p in (FALLBACK, REQUANT)
        },
        "excluded_from_fit": first_text,
        "calibration_s": round(rt["calibration_seconds"][0], 3),
        "all_int8_trial_s": round(times["all_int8"][""], 3),
        "blocks_reused": rt["blocks_reused"],
        "blocks_run": rt["blocks_run"],
        "rss_at_pass_start_gib": rt["rss_at_start_gib"],
        "peak_rss_gib": rt.get("peak_rss_gib"),
        "peak_rss_scope": rt.get("peak_rss_scope"),
        "peak_gpu_memory_gib": rt.get("peak_gpu_memory_gib"),
        "projection": {
            "label": "PROJECTION from the measured per-trial seconds, not a measured full pass",
            "phase_s": {p: round(v, 1) for p, v in per_phase.items()},
            "per_confidence_batch_s": round(per_batch, 1),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--size", default="3b", choices=("3b", "7b"))
    ap.add_argument("--batch", type=int, default=1, help="samples in the one confidence batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vision-ops", type=int, default=2)
    ap.add_argument("--text-ops", type=int, default=4)
    ap.add_argument(
        "--suffix-reuse", default="off,on", help="one sampled pass per setting, in this order (off, on)"
    )
    ap.add_argument("--workspace", type=Path, default=Path(".op_sensitivity_work/bench_full_size"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    settings = [{"off": False, "on": True}[v] for v in args.suffix_reuse.split(",")]

    start = time.perf_counter()
    model, batches, inventory = full_size_inputs(args.batch, 0, args.size)
    build_s = time.perf_counter() - start
    model_params = sum(p.numel() for p in model.parameters())  # tied weights once
    rss_built = current_rss_gib()
    base = load_params(args.params).sensitivity
    params = replace(
        base,
        confidence_batches=1,
        batch_size=args.batch,
        max_ops=10_000,
        native=replace(base.native, device=args.device, arithmetic="fake_quant", dtype="float32"),
    )
    spec = replace(
        build_spec(params, inventory, batches, "image_caption"), model_sha256=f"benchmark-{args.size}"
    )
    towers = {op.name: op.tower for op in inventory}
    scored = [name for name, _ in spec.scored]
    vision = [n for n in scored if towers[n] == "vision"]
    text = [n for n in scored if towers[n] != "vision"]
    sampled = set(evenly(vision, args.vision_ops) + evenly(text, args.text_ops))
    passes = []
    for reuse in settings:
        run_spec = replace(spec, params=replace(params, native=replace(params.native, suffix_reuse=reuse)))
        passes.append(sampled_pass(model, run_spec, sampled, towers, args.workspace))
        print(json.dumps(passes[-1]), flush=True)
    peak = max(p.get("peak_gpu_memory_gib") or p["peak_rss_gib"] for p in passes)
    doc = {
        "machine": _machine(),
        "model": f"Qwen2.5-VL-{args.size.upper()}-Instruct architecture, seeded random bf16 weights",
        "batch": f"{args.batch} sample(s), 448x448 image + caption, "
        f"{batches[0]['input_ids'].shape[1]} tokens",
        "numerics": {"device": args.device, "dtype": "float32", "arithmetic": "fake_quant"},
        "ops": {"vision": len(vision), "text": len(text)},
        "model_params": model_params,
        "build_s": round(build_s, 1),
        "rss_after_build_gib": rss_built,
        "peak_bytes_per_param": round(peak * 2**30 / model_params, 3),
        "confidence_batches_in_params": base.confidence_batches,
        "passes": passes,
    }
    print(json.dumps(doc, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
