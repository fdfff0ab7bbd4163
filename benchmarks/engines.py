"""Side-by-side speed of the sensitivity engines on one model, one machine, one run.

    python benchmarks/engines.py                       # tiny default model from `make repro` outputs
    python benchmarks/engines.py --full-size --engines native --device cuda
        # the full 3B architecture with random weights, native engine only
    python benchmarks/engines.py --full-size --engines native-fake_quant --device cuda \\
        --precisions float32,tf32,bfloat16 --results-dir bench_results
        # one model build, one pass per precision, each pass's raw values saved
    python benchmarks/engines.py --full-size --engines native-fake_quant --device cuda \\
        --precisions tf32,float32 --suffix-reuse on,off --results-dir bench_results
        # one pass per precision and suffix-reuse setting, side by side on one build
    python benchmarks/engines.py --compare bench_results
        # reduced precisions against float32, per phase (needs the project's full environment)

Per engine (and precision): seconds per phase, seconds per op (phase seconds / (ops x confidence
batches)) and the ratio to INC. Prints a Markdown table and writes JSON (--out). The full-size mode
builds the Qwen2.5-VL-3B architecture with seeded random weights in memory and a synthetic batch
(a 448x448 image + a caption per sample) - it measures speed and memory, not sensitivity.

Precisions (``--precisions``, native engines): ``float32``, ``tf32`` (float32 with ``allow_tf32``
on CUDA), ``bfloat16``, ``float16``. Every pass starts from the same float32 weights: a pass in a
reduced dtype that is not the last one is followed by a restore from a float32 copy on the CPU.
``--results-dir`` keeps each pass's raw values (``<engine>_<precision>.json``: the engine's
``PassResult`` and the op inventory); ``--compare DIR`` turns them into reports with
``engines.artifact.build_report`` and compares each precision with the float32 pass of the same
engine with ``report.comparison.compare_phase`` (Spearman, top-10 overlap, median and max relative
difference; requant on the increments of the cumulative curve). The comparison is a separate step
because ``build_report`` records the installed neural-compressor version, which a GPU machine may
lack. With ``--suffix-reuse`` the passes run once per setting (``sensitivity.native.suffix_reuse``);
each is compared with the float32 pass of the same setting where there is one, and a pass without
reuse with the pass with reuse of the same precision (on a GPU, where the kernels' determinism is
what makes them equal).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from op_sensitivity.engines.contract import (
    Capture,
    ExcludedOp,
    HelperCall,
    PassResult,
    build_spec,
)
from op_sensitivity.engines.runner import host_facts, load_inputs, run_engine
from op_sensitivity.inventory import OpInfo
from op_sensitivity.params import load_params

# precision name -> (native dtype, allow_tf32)
PRECISIONS = {
    "float32": ("float32", False),
    "tf32": ("float32", True),
    "bfloat16": ("bfloat16", False),
    "float16": ("float16", False),
}


def _machine() -> str:
    h = host_facts()
    return (
        f"{h['cpu']}, {h['torch_threads']} torch threads, {h['gpu'] or 'no GPU'}, torch {torch.__version__}"
    )


def full_size_inputs(batch: int, seed: int, size: str = "3b", sizes=None, pixels: int = 448):
    """Random model + processor-made batch (a ``pixels`` x ``pixels`` image and a caption per sample).

    The full-size architecture ``size``, or with ``sizes`` (a ``TinyModelParams``) a reduced one.
    """
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from op_sensitivity.inventory import op_inventory
    from op_sensitivity.model.full_size import build_full_size_model
    from op_sensitivity.model.processor import CHAT_TEMPLATE, ImageTextProcessor
    from op_sensitivity.model.tiny import build_tiny_model
    from op_sensitivity.model.tokenizer import train_tokenizer

    captions = ["A red circle on a blue background, drawn with care by a patient hand."] * batch
    tokenizer = train_tokenizer(captions, 400)
    area = pixels * pixels
    processor = ImageTextProcessor(
        tokenizer, Qwen2VLImageProcessorPil(min_pixels=area, max_pixels=area), CHAT_TEMPLATE
    )
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (pixels, pixels, 3), dtype=np.uint8)) for _ in captions]
    if sizes is None:
        model = build_full_size_model(tokenizer, seed, size)
    else:
        model = build_tiny_model(sizes, tokenizer, seed).to(torch.bfloat16)
    return model, [processor.encode(captions, images)], op_inventory(model)


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


def _tensors(model: nn.Module) -> chain:
    """Every parameter and buffer under each of its names (tied weights too)."""
    return chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def fp32_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in _tensors(model)}


@torch.no_grad()
def restore_fp32(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Back to float32 where the model is, with the values of ``saved`` (a bf16 round trip is lossy)."""
    model.float()
    for name, t in _tensors(model):
        if name in saved:
            t.copy_(saved[name])


Run = tuple[str, str, bool | None]  # engine, precision, suffix reuse (None: the params' setting)


def _runs(engines: str, precisions: list[str], reuse: list[bool | None]) -> list[Run]:
    """(engine, precision, suffix reuse) runs; INC has neither and runs once, in float32."""
    runs = []
    for name in engines.split(","):
        if name == "inc":
            runs.append((name, "float32", None))
            continue
        runs += [(name, precision, r) for precision in precisions for r in reuse]
    return runs


def _label(name: str, precision: str, reuse: bool | None) -> str:
    return f"{name}_{precision}" + ("" if reuse is None else f"_reuse-{'on' if reuse else 'off'}")


def _result_doc(
    name: str, precision: str, reuse: bool | None, result: PassResult, inventory: list[OpInfo]
) -> dict[str, Any]:
    return {
        "engine": name,
        "precision": precision,
        "suffix_reuse": reuse,
        "result": asdict(result),
        "inventory": [asdict(op) for op in inventory],
    }


def _result_from_doc(doc: dict[str, Any]) -> tuple[PassResult, list[OpInfo]]:
    r = dict(doc["result"])
    calls = [
        HelperCall(
            c["phase"],
            c["batch"],
            main=[(tuple(k), v) for k, v in c["main"]],
            double_check=None if c["double_check"] is None else [(tuple(k), v) for k, v in c["double_check"]],
            returned=[tuple(k) for k in c["returned"]],
            seconds=c["seconds"],
        )
        for c in r.pop("capture")["calls"]
    ]
    result = PassResult(
        Capture(calls),
        [tuple(k) for k in r.pop("op_order")],
        [ExcludedOp(**e) for e in r.pop("excluded")],
        **r,
    )
    return result, [OpInfo(**op) for op in doc["inventory"]]


def _pairs(keys: list[Run]) -> list[tuple[Run, Run]]:
    """(pass, reference) pairs: reduced precisions against float32 of the same reuse setting, and
    a pass without reuse against the pass with reuse of the same precision."""
    pairs = []
    for engine, precision, reuse in keys:
        if precision != "float32" and (engine, "float32", reuse) in keys:
            pairs.append(((engine, precision, reuse), (engine, "float32", reuse)))
        if reuse is False and (engine, precision, True) in keys:
            pairs.append(((engine, precision, reuse), (engine, precision, True)))
    return pairs


def compare(results_dir: Path) -> list[dict[str, Any]]:
    """Each pass against its reference pass (:func:`_pairs`), per phase."""
    from op_sensitivity.engines.artifact import build_report
    from op_sensitivity.phases import PHASES
    from op_sensitivity.report.comparison import compare_phase

    docs = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    docs = [d for d in docs if isinstance(d, dict) and "result" in d]  # skip timing rows and comparisons
    reports = {
        (d["engine"], d["precision"], d.get("suffix_reuse")): build_report(*_result_from_doc(d), {})
        for d in docs
    }
    rows = []
    for key, ref in _pairs(sorted(reports, key=str)):
        for phase in PHASES:
            c = compare_phase(reports[key], reports[ref], phase)
            rows.append({"pass": _label(*key), "reference": _label(*ref), "phase": phase, **c})
    _table(
        ["pass", "reference", "phase", "compared", "ops", "Spearman", "top-10 overlap"]
        + ["median rel. diff", "max rel. diff"],
        [
            [r["pass"], r["reference"], r["phase"], r["compared"], r["ops"], f"{r['spearman']:.3f}"]
            + [f"{r['top10_overlap']:.0%}", f"{r['median_rel_diff']:.2%}", f"{r['max_rel_diff']:.2%}"]
            for r in rows
        ],
    )
    (results_dir / "comparison.json").write_text(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--engines", default="inc,native,native-fake_quant")
    ap.add_argument("--confidence-batches", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--allow-tf32", action="store_true")
    ap.add_argument(
        "--precisions",
        default=None,
        help=f"comma-separated, from {','.join(PRECISIONS)}: one native pass each on one model build "
        "(overrides --dtype/--allow-tf32)",
    )
    ap.add_argument(
        "--full-size", action="store_true", help="full 3B architecture, random weights (native only)"
    )
    ap.add_argument("--full-size-batch", type=int, default=4)
    ap.add_argument(
        "--suffix-reuse",
        default=None,
        help="comma-separated on/off: one native pass per setting (default: params.yaml's)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--results-dir", type=Path, default=None, help="write each pass's raw values here (for --compare)"
    )
    ap.add_argument(
        "--compare", type=Path, metavar="DIR", help="compare the passes saved in DIR, run nothing"
    )
    args = ap.parse_args()
    if args.compare is not None:
        compare(args.compare)
        return
    if args.precisions is None:
        precisions = ["tf32" if args.allow_tf32 and args.dtype == "float32" else args.dtype]
    else:
        precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        ap.error(f"--precisions: unknown {unknown}; choose from {list(PRECISIONS)}")
    params = load_params(args.params).sensitivity
    params = replace(
        params,
        confidence_batches=args.confidence_batches,
        max_ops=10_000,
        native=replace(params.native, device=args.device),
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
    reuse = [None] if args.suffix_reuse is None else [v == "on" for v in args.suffix_reuse.split(",")]
    runs = _runs(args.engines, precisions, reuse)
    lossy = [i for i, (_, p, _) in enumerate(runs) if PRECISIONS[p][0] != "float32"]
    saved = fp32_copy(model) if lossy and lossy[0] < len(runs) - 1 else None
    if args.results_dir:
        args.results_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, precision, reuse_on) in enumerate(runs):
        engine, _, arithmetic = name.partition("-")
        dtype, tf32 = PRECISIONS[precision]
        native = replace(spec.params.native, arithmetic=arithmetic or "auto", dtype=dtype, allow_tf32=tf32)
        if reuse_on is not None:
            native = replace(native, suffix_reuse=reuse_on)
        run_spec = replace(spec, params=replace(spec.params, native=native))
        if engine == "inc":
            model = model.cpu()
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
                "precision": precision,
                "suffix_reuse": native.suffix_reuse if engine != "inc" else None,
                "ops": n_ops,
                "fallback_s": round(seconds["fallback"], 3),
                "requant_s": round(seconds["requant"], 3),
                "total_s": round(total, 3),
                "s_per_op": sum(seconds.values()) / trials,
                "all_int8_mse": result.all_int8_mse,
                "calibration_s": result.runtime.get("calibration_seconds"),
                "blocks_reused": result.runtime.get("blocks_reused"),
                "blocks_run": result.runtime.get("blocks_run"),
                **result.details,
                **memory,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # after every pass: a run cut short keeps what it measured
            args.out.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2))
        if args.results_dir:
            doc = _result_doc(name, precision, reuse_on, result, inventory)
            (args.results_dir / f"{_label(name, precision, reuse_on)}.json").write_text(json.dumps(doc))
        if saved is not None and dtype != "float32" and i < len(runs) - 1:
            restore_fp32(model, saved)
    inc = next((r for r in rows if r["engine"] == "inc"), None)
    for r in rows:
        r["speedup_vs_inc"] = round(inc["s_per_op"] / r["s_per_op"], 1) if inc else None
    print(f"machine: {_machine()}")
    table = []
    for r in rows:
        mem = r.get("peak_gpu_memory_gib", r.get("peak_rss_gib"))
        table.append(
            [r["engine"], r["precision"], r["suffix_reuse"], r["ops"], r["fallback_s"], r["requant_s"]]
            + [r["total_s"], f"{r['s_per_op']:.4f}", r["speedup_vs_inc"] or "-"]
            + [f"{mem} GiB" if mem is not None else "-"]
        )
    _table(
        ["engine", "precision", "suffix reuse", "ops", "fallback s", "requant s", "total s", "s/op"]
        + ["speedup vs INC"]
        + ["peak memory"],
        table,
    )
    if args.out:
        args.out.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
