"""Today's native pass against the new one, side by side on one model build, one machine, one run.

    python benchmarks/screening.py                     # CPU: a mid-size Qwen2.5-VL, bf16 screening
    python benchmarks/screening.py --full-size --device cuda --screening tf32 --kernels \\
        --out benchmarks/results/screening-gpu.json    # the 3B on one GPU (issue 20's figures)

Passes (each from the same float32 weights and batch, ``sensitivity.native`` otherwise as params.yaml):

* ``loop``: the path before issue 20 - transformers' vision attention, one call per window
  (``engines.vision_attention`` switched off for this pass only), one trial per forward
  (``trial_batch`` 1), float32, no screening. (Its calibration is already the one-forward one.)
* ``batched``: one attention call per window length and ``trial_batch`` as params.yaml, float32:
  values must equal ``loop``'s to the bit (checked; the script fails otherwise).
* ``screened``: ``batched`` with ``--screening`` (bf16 on CPU, tf32 or bf16 on CUDA): every trial
  in the fast precision, float32 re-measures where the ranking is decided (``engines.screening``),
  once per ``--margins`` value (1: the triangle-inequality bound; below 1: a tighter, checked one).
* with ``--kernels``: the deployment schemes' low-precision matmuls (``modelopt_int8`` through
  ``torch._int_mm``, ``modelopt_fp8`` through ``torch._scaled_mm``) against the same scheme in
  fake-quant, float32: agreement and cost of the "sensitivity under a GPU-executed path".

For each pass: seconds per phase (fallback, requant, refine), calibration seconds, peak memory;
against its reference (``loop`` for the others, fake-quant for the kernels): Spearman per phase,
top-10 and top-``exact_top`` overlap, median relative difference, and whether the keep-lists of
the rank-only policies (top_k 5, error_budget 50 %) and the ranking's top ``exact_top`` are
identical. A measured policy (measured_budget) walks the same ranking from its top, so it ships
the same list wherever that list is no longer than ``exact_top``. JSON goes to ``--out`` after
every pass (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from engines import _machine, fp32_copy, full_size_inputs, restore_fp32  # noqa: E402

from op_sensitivity.engines import native  # noqa: E402
from op_sensitivity.engines.contract import PassResult, build_spec  # noqa: E402
from op_sensitivity.params import TinyModelParams, load_params  # noqa: E402
from op_sensitivity.phases import FALLBACK, PHASES, REQUANT  # noqa: E402
from op_sensitivity.report.comparison import compare_phase  # noqa: E402

# a mid-size model for CPU figures: the 3B's structure at about a fifth of its width
MID = TinyModelParams(
    text={
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    },
    vision={"depth": 4, "hidden_size": 256, "intermediate_size": 768, "num_heads": 4},
    vocab_size=4096,
)


@contextlib.contextmanager
def vision_loop() -> Any:
    """transformers' own per-window loop for the passes inside (the path before issue 20)."""
    saved = native.batched_window_attention
    native.batched_window_attention = lambda model: contextlib.nullcontext(0)
    try:
        yield
    finally:
        native.batched_window_attention = saved


def report_like(result: PassResult) -> dict[str, Any]:
    """The parts of a sensitivity report that ``compare_phase`` and the rank-only policies read."""
    phases = {}
    for phase in PHASES:
        calls = result.capture.phase(phase)
        order = {k[0]: i for i, k in enumerate(result.op_order)}
        values: dict[str, list[float]] = {}
        for call in calls:
            for (name, _), v in call.main:
                values.setdefault(name, []).append(v)
        ops = [
            {"module": m, "position": order[m], "mse": sum(v) / len(v), "mse_per_batch": v}
            for m, v in sorted(values.items(), key=lambda kv: order[kv[0]])
        ]
        phases[phase] = {"ops": ops, "cumulative": phase == REQUANT and result.requant_mode == "cumulative"}
    return {"phases": phases}


def ranking(report: dict[str, Any], phase: str) -> list[str]:
    """Most sensitive first, ties by position (``report.scores``)."""
    ops = pd.DataFrame(report["phases"][phase]["ops"]).sort_values("position")
    if phase == FALLBACK:
        score = -ops["mse"]
    elif report["phases"][phase]["cumulative"]:
        score = ops["mse"].diff().fillna(ops["mse"].iloc[0])
    else:
        score = ops["mse"]
    ops = ops.assign(score=score).sort_values(["score", "position"], ascending=[False, True], kind="stable")
    return list(ops["module"]), list(ops["score"])


def keep_lists(report: dict[str, Any], exact_top: int) -> dict[str, list[str]]:
    """The rank-only policies' lists per phase: top_k 5, error_budget 50 %, the top exact_top."""
    out = {}
    for phase in PHASES:
        names, scores = ranking(report, phase)
        positive = [max(s, 0.0) for s in scores]
        total, acc, n = sum(positive), 0.0, 0
        while total > 0 and acc < 0.5 * total:
            acc, n = acc + positive[n], n + 1
        out[f"{phase}/top_k5"] = sorted(names[:5])
        out[f"{phase}/error_budget50"] = sorted(names[:n])
        out[f"{phase}/top{exact_top}"] = names[:exact_top]
    return out


def agreement(cand: dict, ref: dict, exact_top: int) -> dict[str, Any]:
    rows = {}
    for phase in PHASES:
        c = compare_phase(cand, ref, phase)
        a, b = ranking(cand, phase)[0][:exact_top], ranking(ref, phase)[0][:exact_top]
        rows[phase] = {
            "spearman": round(c["spearman"], 4),
            "top10_overlap": c["top10_overlap"],
            f"top{exact_top}_overlap": len(set(a) & set(b)) / max(1, len(b)),
            "median_rel_diff": c["median_rel_diff"],
        }
    lists_c, lists_r = keep_lists(cand, exact_top), keep_lists(ref, exact_top)
    rows["keep_lists_identical"] = {k: lists_c[k] == lists_r[k] for k in lists_r}
    return rows


def run(model, make_spec, native_params, label: str, saved) -> tuple[PassResult, float]:
    """One pass; the spec is built for its own settings (each scheme skips its own ops)."""
    run_spec = make_spec(native_params)
    restore_fp32(model, saved)
    if native_params.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = native.run_pass(model, run_spec)
    if native_params.device == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(f"{label}: {total:.1f} s", flush=True)
    return result, total


def row(label: str, result: PassResult, total: float) -> dict[str, Any]:
    rt = result.runtime
    return {
        "pass": label,
        "total_s": round(total, 3),
        "seconds": {k: round(v, 3) for k, v in rt["seconds"].items()},
        "calibration_s": [round(s, 3) for s in rt["calibration_seconds"]],
        "peak": {k: v for k, v in rt.items() if k.startswith("peak")},
        "screening": result.screening
        and {k: result.screening[k] for k in ("precision", "margin_used", "observed_ratio")}
        | {"refined": {p: len(v) for p, v in result.screening["refined"].items()}},
        "details": result.details,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--full-size", action="store_true", help="the published 3B architecture, random weights")
    ap.add_argument("--batch", type=int, default=2, help="samples (448x448 image + caption) per batch")
    ap.add_argument("--pixels", type=int, default=448)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--screening", default="bfloat16", choices=["bfloat16", "tf32"])
    ap.add_argument("--exact-top", type=int, default=32)
    ap.add_argument(
        "--margins", default="1.0,0.1", help="comma-separated screening_margin values, a pass each"
    )
    ap.add_argument("--kernels", action="store_true", help="also int8/fp8 kernels vs fake-quant")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sens = load_params(args.params).sensitivity
    model, batches, inventory = full_size_inputs(
        args.batch, 0, sizes=None if args.full_size else MID, pixels=args.pixels
    )
    sens = replace(sens, engine="native", confidence_batches=1, batch_size=args.batch, max_ops=10_000)
    spec = build_spec(sens, inventory, batches, "image_caption")

    def make_spec(native_params):
        return build_spec(replace(sens, native=native_params), inventory, batches, "image_caption")

    if args.device == "cuda":
        model = model.cuda()
    saved = fp32_copy(model)
    base = replace(sens.native, device=args.device, dtype="float32", allow_tf32=False, processes=1)
    base = replace(base, arithmetic="fake_quant" if args.device == "cuda" else base.arithmetic)
    doc: dict[str, Any] = {
        "machine": _machine(),
        "model": "3b" if args.full_size else "mid (benchmarks/screening.py MID)",
        "ops": len(spec.scored),
        "batch": f"{args.batch} x {args.pixels}x{args.pixels} image + caption",
        "passes": [],
        "agreement": {},
    }
    reports = {}

    def keep(label: str, result: PassResult, total: float) -> None:
        reports[label] = report_like(result)
        doc["passes"].append(row(label, result, total))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=2))

    with vision_loop():
        keep("loop", *run(model, make_spec, replace(base, trial_batch=1), "loop", saved))
    batched, total = run(model, make_spec, base, "batched", saved)
    keep("batched", batched, total)
    same = reports["batched"] == reports["loop"]
    doc["batched_equals_loop"] = same
    if not same:
        raise SystemExit("batched vision attention changed values: see the passes in --out")
    for margin in [float(m) for m in args.margins.split(",")]:
        label = f"screened/{args.screening}/margin {margin:g}"
        screened = replace(base, screening=args.screening, exact_top=args.exact_top, screening_margin=margin)
        keep(label, *run(model, make_spec, screened, label, saved))
        doc["agreement"][f"{label}_vs_float32"] = agreement(reports[label], reports["loop"], args.exact_top)
    if args.kernels:
        for scheme, kernel in (("modelopt_int8", "int8_kernels"), ("modelopt_fp8", "fp8_kernels")):
            for arithmetic in ("fake_quant", kernel):
                params = replace(base, scheme=scheme, arithmetic=arithmetic)
                keep(
                    f"{scheme}/{arithmetic}", *run(model, make_spec, params, f"{scheme} {arithmetic}", saved)
                )
            doc["agreement"][f"{scheme}/{kernel}_vs_fake_quant"] = agreement(
                reports[f"{scheme}/{kernel}"], reports[f"{scheme}/fake_quant"], args.exact_top
            )
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k != "passes"}, indent=2))
    for p in doc["passes"]:
        print(json.dumps(p))


if __name__ == "__main__":
    main()
