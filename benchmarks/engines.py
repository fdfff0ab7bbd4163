"""Side-by-side speed of the sensitivity engines on one model, one machine, one run.

    python benchmarks/engines.py                       # tiny default model from `make repro` outputs
    python benchmarks/engines.py --full-size --engines native --device cuda
        # the full 3B architecture with random weights, native engine only

Per engine: seconds per phase, seconds per op (phase seconds / (ops x confidence batches)) and
the ratio to INC. Prints a Markdown table and writes JSON (--out). The full-size mode builds the
Qwen2.5-VL-3B architecture with seeded random weights in memory and a synthetic batch (a 448x448
image + a caption) - it measures speed and memory, not sensitivity.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from op_sensitivity.engines.contract import build_spec
from op_sensitivity.engines.runner import host_facts, load_inputs, run_engine
from op_sensitivity.params import load_params


def _machine() -> str:
    h = host_facts()
    return (
        f"{h['cpu']}, {h['torch_threads']} torch threads, {h['gpu'] or 'no GPU'}, torch {torch.__version__}"
    )


def full_size_inputs(batch: int, seed: int):
    """Full-size random model + processor-made batch (448x448 image and a caption per sample)."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from op_sensitivity.inventory import op_inventory
    from op_sensitivity.model.full_size import build_full_size_model
    from op_sensitivity.model.processor import CHAT_TEMPLATE, ImageTextProcessor
    from op_sensitivity.model.tokenizer import train_tokenizer

    captions = ["A red circle on a blue background, drawn with care by a patient hand."] * batch
    tokenizer = train_tokenizer(captions, 400)
    processor = ImageTextProcessor(
        tokenizer, Qwen2VLImageProcessorPil(min_pixels=448 * 448, max_pixels=448 * 448), CHAT_TEMPLATE
    )
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8)) for _ in captions]
    model = build_full_size_model(tokenizer, seed)
    return model, [processor.encode(captions, images)], op_inventory(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--engines", default="inc,native,native-fake_quant")
    ap.add_argument("--confidence-batches", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--allow-tf32", action="store_true")
    ap.add_argument(
        "--full-size", action="store_true", help="full 3B architecture, random weights (native only)"
    )
    ap.add_argument("--full-size-batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    params = load_params(args.params).sensitivity
    params = replace(
        params,
        confidence_batches=args.confidence_batches,
        max_ops=10_000,
        native=replace(params.native, device=args.device, dtype=args.dtype, allow_tf32=args.allow_tf32),
    )
    if args.full_size:
        model, batches, inventory = full_size_inputs(args.full_size_batch, 0)
        params = replace(params, batch_size=args.full_size_batch)
        spec = build_spec(params, inventory, batches, "image_caption")
    else:
        model, spec, inventory, _ = load_inputs(
            params,
            Path("data/calibration"),
            Path("models/qwen2_5_vl"),
            Path("reports/model/op_inventory.json"),
        )
    rows = []
    for name in args.engines.split(","):
        engine, _, arithmetic = name.partition("-")
        native = replace(spec.params.native, arithmetic=arithmetic or "auto")
        run_spec = replace(spec, params=replace(spec.params, native=native))
        start = time.perf_counter()
        result = run_engine(engine, model, run_spec, Path(".op_sensitivity_work/bench"))
        total = time.perf_counter() - start
        n_ops = len(result.capture.phase("fallback")[0].main)
        trials = n_ops * 2 * params.confidence_batches
        seconds = result.runtime["seconds"]
        memory = {k: v for k, v in result.runtime.items() if k.startswith("peak")}
        rows.append(
            {
                "engine": name,
                "ops": n_ops,
                "fallback_s": round(seconds["fallback"], 3),
                "requant_s": round(seconds["requant"], 3),
                "total_s": round(total, 3),
                "s_per_op": sum(seconds.values()) / trials,
                **result.details,
                **memory,
            }
        )
        model = model.cpu().float()
    inc = next((r for r in rows if r["engine"] == "inc"), None)
    for r in rows:
        r["speedup_vs_inc"] = round(inc["s_per_op"] / r["s_per_op"], 1) if inc else None
    print(f"machine: {_machine()}")
    print("| engine | ops | fallback s | requant s | s/op | speedup vs INC | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mem = r.get("peak_gpu_memory_gib", r.get("peak_rss_gib"))
        mem_text = f"{mem} GiB" if mem is not None else "-"
        print(
            f"| {r['engine']} | {r['ops']} | {r['fallback_s']} | {r['requant_s']} | {r['s_per_op']:.4f} | "
            f"{r['speedup_vs_inc'] or '-'} | {mem_text} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
