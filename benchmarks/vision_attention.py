"""Batched window attention side by side: the Qwen2.5-VL-3B vision tower with and without it, CPU.

    python benchmarks/vision_attention.py                     # 4 blocks, 1 and 4 images of 448x448
    python benchmarks/vision_attention.py --blocks 8 --images 1,2,4 --repeats 5
    python benchmarks/vision_attention.py --threads 1 --out /tmp/one_thread.json

The 3B's vision tower at full width (hidden 1280, 16 heads, intermediate 3420, window 112, patch
14, from ``model/configs``) with ``--blocks`` blocks, the full-attention ones at the 3B's indexes
below that depth (7, 15, ...) or else the last block; seeded random float32 weights, sdpa. Per
image count (``--images``, each ``--pixels`` square: grid [1, 32, 32] at 448) one untimed forward
each way counts the attention-interface calls and checks that the outputs are equal bit for bit
(the script stops if not), then the forwards alternate (transformers' loop, batched, ...
``--repeats`` times each) so drift in the machine's speed hits both; the median is reported.
Why: ``engines/vision_attention.py`` replaces one attention call per window (1,808 per forward for
the full 3B and 4 images) by one per window length; on a GPU that loop is launch-bound. On a CPU
a call is cheap to launch, but each is its own small OpenMP parallel region (16 heads x one
window), and those suffer when another process holds a core: the JSON records the load average,
and ``--threads 1`` takes the thread barriers out of the comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from op_sensitivity.engines.runner import host_facts
from op_sensitivity.engines.vision_attention import batched_window_attention
from op_sensitivity.model.full_size import published_config

REPO = Path(__file__).resolve().parents[1]
MODES = ("loop", "batched")  # transformers' forward, batched_window_attention


def vision_tower(blocks: int, seed: int) -> qwen.Qwen2_5_VisionTransformerPretrainedModel:
    values = dict(published_config("3b")["vision_config"])
    full = [i for i in values["fullatt_block_indexes"] if i < blocks] or [blocks - 1]
    values.update(depth=blocks, fullatt_block_indexes=full)
    config = Qwen2_5_VLVisionConfig(**values)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = qwen.Qwen2_5_VisionTransformerPretrainedModel(config)
    return model.float().eval()


def pixel_patches(
    config: Qwen2_5_VLVisionConfig, images: int, pixels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    side = pixels // config.patch_size
    grid_thw = torch.tensor([[1, side, side]] * images)
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    x = torch.randn(images * side * side, width, generator=torch.Generator().manual_seed(images))
    return x, grid_thw


@contextlib.contextmanager
def counted_sdpa() -> Iterator[list[int]]:
    """Count calls of the sdpa attention interface (a local override, removed after)."""
    function = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", qwen.eager_attention_forward)
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return function(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = counting
    try:
        yield calls
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]


@contextlib.contextmanager
def attention_seconds(model: torch.nn.Module) -> Iterator[list[float]]:
    """Wall seconds inside the vision attention modules (qkv, rope, attention, proj), summed."""
    total, starts = [0.0], []
    modules = [m for m in model.modules() if isinstance(m, qwen.Qwen2_5_VLVisionAttention)]
    handles = [m.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())) for m in modules]
    handles += [
        m.register_forward_hook(
            lambda *_: total.__setitem__(0, total[0] + time.perf_counter() - starts.pop())
        )
        for m in modules
    ]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


def forward(model: torch.nn.Module, x: torch.Tensor, grid_thw: torch.Tensor, mode: str) -> torch.Tensor:
    with (
        torch.inference_mode(),
        batched_window_attention(model) if mode == "batched" else contextlib.nullcontext(),
    ):
        return model(x, grid_thw).pooler_output


def measure(model: torch.nn.Module, images: int, pixels: int, repeats: int) -> dict:
    x, grid_thw = pixel_patches(model.config, images, pixels)
    calls, outputs = {}, {}
    for mode in MODES:  # untimed: counts, equality, warm-up
        with counted_sdpa() as n:
            outputs[mode] = forward(model, x, grid_thw, mode)
        calls[mode] = n[0]
    if not torch.equal(outputs["loop"], outputs["batched"]):
        diff = (outputs["loop"] - outputs["batched"]).abs().max().item()
        raise SystemExit(
            f"{images} image(s): batched output differs from transformers' (max |diff| {diff:g})"
        )
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    attention: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            with attention_seconds(model) as inside:
                start = time.perf_counter()
                forward(model, x, grid_thw, mode)
                seconds[mode].append(round(time.perf_counter() - start, 4))
            attention[mode].append(round(inside[0], 4))
    median = {m: statistics.median(v) for m, v in seconds.items()}
    attention_median = {m: statistics.median(v) for m, v in attention.items()}
    row = {
        "images": images,
        "tokens": int(x.shape[0]),
        "attention_calls": calls,
        "outputs_equal": True,
        "seconds": seconds,
        "median_seconds": median,
        "speedup": round(median["loop"] / median["batched"], 3),
        "attention_module_seconds": attention,
        "attention_module_median_seconds": attention_median,
        "attention_module_speedup": round(attention_median["loop"] / attention_median["batched"], 3),
    }
    print(json.dumps(row), flush=True)
    return row


def machine() -> dict:
    return {
        **host_facts(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4, help="vision blocks (the 3B has 32)")
    ap.add_argument("--images", default="1,4", help="image counts, comma-separated")
    ap.add_argument("--pixels", type=int, default=448)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/vision_attention.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    host = machine()
    model = vision_tower(args.blocks, args.seed)
    c = model.config
    what = (
        f"Qwen2.5-VL-3B vision tower, random float32 weights, hidden {c.hidden_size}, {c.num_heads} heads, "
        f"intermediate {c.intermediate_size}, {c.depth} blocks (full attention {c.fullatt_block_indexes}), "
        f"window {c.window_size}, sdpa; {args.pixels}x{args.pixels} images"
    )
    print(
        f"machine: {host['cpu']} ({host['isa']}), {host['cpu_count']} CPUs, "
        f"{host['torch_threads']} torch threads, {host['platform']}, torch {host['torch']}\n{what}",
        flush=True,
    )
    load_before = os.getloadavg()
    rows = [measure(model, int(n), args.pixels, args.repeats) for n in args.images.split(",")]
    doc = {
        "what": what,
        "machine": host,
        "random_weights": True,
        "repeats": args.repeats,
        "timing": "tower forward (inference_mode), modes alternating, median of repeats; one untimed forward "
        "per mode first. attention_module_*: the part of those seconds inside the vision attention modules "
        "(qkv, rope, attention, proj; forward hooks)",
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        "rows": rows,
    }
    print(
        "| images | tokens | attention calls loop / batched | tower s loop | tower s batched | speedup "
        "| attention-module s loop | batched | speedup | equal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, a, n = r["median_seconds"], r["attention_module_median_seconds"], r["attention_calls"]
        print(
            f"| {r['images']} | {r['tokens']} | {n['loop']} / {n['batched']} "
            f"| {m['loop']:.3f} | {m['batched']:.3f} | {r['speedup']:.2f}x "
            f"| {a['loop']:.3f} | {a['batched']:.3f} | {r['attention_module_speedup']:.2f}x "
            f"| {r['outputs_equal']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
