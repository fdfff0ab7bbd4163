"""A quantize target's artifact of the full-size 3B, written and loaded back on this machine.

    python benchmarks/quantize_full_size.py --work /tmp/q3b --out benchmarks/results/quantize-3b.json
    python benchmarks/quantize_full_size.py --work /tmp/q3b --target modelopt_int8 --out ...

Issue 21 asks that the compressed-tensors checkpoint of the ``full_size_random`` 3B (seeded random
bf16 weights, the published architecture and dtype) be written and loaded back within the 24 GB
machine without a float32 copy of the model. This runs the quantize stage's own backend
(``write``, ``quantized_in``, ``load``) on that model directory, with the list the target's scheme
quantizes when nothing is kept (its op types, less its tool's default skips: for
``llmcompressor_w8a8`` every Linear but the tied ``lm_head``), calibrated on one batch (the
image and caption below), and records per phase the wall seconds and the peak resident set (the kernel's
``VmHWM``, reset before each phase), the bytes on disk, and one forward of the loaded checkpoint
on one image (resized by the model directory's processor, ``model.processor`` bounds) with a
caption: it runs and its logits are finite (the weights are random, so no damage is measured).

The model directory is built first in a child process (``load_model``'s ``materialize_model``),
so its memory is not this process's. The weights are random: the sizes and memory are the real
model's, the logits are not a model's.

``--layers N --vision-blocks M``: the published widths with only the first N decoder layers and M
vision blocks (``model.carve.carved_config``), for a target that does not fit whole here
(``ort_qdq`` exports float32): its memory per float32 byte, measured at the real width, with
images up to 224 x 224 as ``profiles/3b-cpu.yaml`` bounds them (4 attention windows an image). The
runtime then also serves a second image of another size and caption (another input layout), and
for ``ort_qdq`` the float32 serving graph is then checked against transformers on both layouts.

    python benchmarks/quantize_full_size.py --work /tmp/o3b --target ort_qdq --layers 2 --vision-blocks 8
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from engines import _machine  # this directory is on sys.path when run as a script

from op_sensitivity.engines.contract import scheme_exclusion
from op_sensitivity.engines.memory import _status_gib, current_rss_gib, reset_peak_rss
from op_sensitivity.inventory import op_inventory
from op_sensitivity.model.source import read_card
from op_sensitivity.quantize.base import Inputs, dir_bytes
from op_sensitivity.quantize.hf_checkpoint import meta_model
from op_sensitivity.quantize.targets import TARGETS
from op_sensitivity.schemes import load as load_scheme

BUILD = """
import contextlib
import sys
from dataclasses import replace
from pathlib import Path
from op_sensitivity.model.carve import carved_full_size
from op_sensitivity.model.source import materialize_model
from op_sensitivity.params import load_params
model = replace(load_params('params.yaml').model, source='full_size_random', full_size=sys.argv[2],
                input=Path('data/calibration'))
layers, blocks = int(sys.argv[3]), int(sys.argv[4])
depth = contextlib.nullcontext()
if layers:  # the published widths, cut in depth; images up to 224x224 (profiles/3b-cpu.yaml)
    model = replace(model, max_pixels=50176)
    depth = carved_full_size(layers, blocks)
with depth:
    materialize_model(model, Path(sys.argv[1]))
"""


def phase(record: dict, name: str, start: float) -> None:
    record[name] = {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib": _status_gib("VmHWM"),
        "rss_after_gib": current_rss_gib(),
    }
    print(name, record[name], flush=True)
    reset_peak_rss()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="model dir and checkpoint go here")
    ap.add_argument("--size", default="3b", choices=["3b", "7b"])
    ap.add_argument("--target", default="compressed_tensors", choices=sorted(TARGETS))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--layers", type=int, default=0, help="decoder layers kept (0: all)")
    ap.add_argument("--vision-blocks", type=int, default=0, help="vision blocks kept (with --layers)")
    args = ap.parse_args()
    if bool(args.layers) != bool(args.vision_blocks):
        ap.error("--layers and --vision-blocks go together")
    model_dir, out_dir = args.work / "model", args.work / args.target
    record: dict = {
        "machine": _machine(),
        "size": args.size,
        "target": args.target,
        "torch_threads": torch.get_num_threads(),
        "layers": args.layers or "all",
        "vision_blocks": args.vision_blocks or "all",
    }
    if not model_dir.exists():
        start = time.perf_counter()
        build = [str(model_dir), args.size, str(args.layers), str(args.vision_blocks)]
        subprocess.run([sys.executable, "-c", BUILD, *build], check=True)
        record["build_model_dir_seconds"] = round(time.perf_counter() - start, 1)
    record["model_dir_bytes"] = dir_bytes(model_dir)
    record["params"] = read_card(model_dir).params
    target = TARGETS[args.target]()
    quantize = scheme_ops(model_dir, target.scheme)
    inputs = Inputs(model_dir, quantize, [_one_batch(model_dir)], args.work, 10**12)
    other = _one_batch(model_dir, (336, 224), "Two grey squares beside a small green triangle on white.")
    reset_peak_rss()
    start = time.perf_counter()
    written = target.write(inputs, out_dir)
    phase(record, "write", start)
    record["artifact_bytes"] = written["bytes"]
    start = time.perf_counter()
    got = target.quantized_in(out_dir)
    phase(record, "read_back", start)
    record["quantized_ops"] = len(got)
    record["read_back_equals_list"] = got == set(quantize)
    gc.collect()
    start = time.perf_counter()
    runtime = target.load(out_dir, inputs)
    phase(record, "load", start)
    start = time.perf_counter()
    with torch.no_grad():
        logits = runtime.forward(inputs.calibration[0])
    phase(record, "forward", start)
    finite = bool(logits.isfinite().all())
    record["logits"] = {"shape": list(logits.shape), "dtype": str(logits.dtype), "finite": finite}
    record["runtime"] = runtime.facts()
    if args.layers:
        with torch.no_grad():
            logits = runtime.forward(other)
        record["other_layout"] = {
            "input_ids": list(other["input_ids"].shape),
            "image_grid_thw": other["image_grid_thw"].tolist(),
            "logits_shape": list(logits.shape),
            "finite": bool(logits.isfinite().all()),
        }
        record["runtime"] = runtime.facts()  # its notes now count both layouts
        runtime.close()
        del runtime
        if args.target == "ort_qdq":  # after the measured phases: its memory is not theirs
            batches = [inputs.calibration[0], other]
            record["fp32_graph_vs_torch"] = _check_serving_graph(model_dir, batches, args.work)
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def scheme_ops(model_dir: Path, scheme: str) -> list[str]:
    """The ops the scheme's tool quantizes in this model (model order), from its config alone."""
    from transformers import AutoConfig

    spec = load_scheme(scheme)
    ops = op_inventory(meta_model(AutoConfig.from_pretrained(model_dir, local_files_only=True)))
    return [op.name for op in ops if scheme_exclusion(spec, op.name, op.type) is None]


def _one_batch(
    model_dir: Path, size: tuple[int, int] = (448, 448), caption: str = "A red circle on a blue background."
) -> dict[str, torch.Tensor]:
    """One random image (``size``: width, height) and a caption through the model directory's own
    processor."""
    import numpy as np
    from PIL import Image

    from op_sensitivity.model.processor import ImageTextProcessor

    processor = ImageTextProcessor.load(model_dir)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return processor.encode([caption], [Image.fromarray(pixels)])


def _check_serving_graph(model_dir: Path, batches: list[dict[str, torch.Tensor]], work: Path) -> dict:
    """The float32 serving graph (``quantize.onnx_serving``), traced on the first batch, against
    transformers on every batch: the largest absolute logit difference, per batch."""
    from op_sensitivity.quantize.onnx_export import is_large, session
    from op_sensitivity.quantize.onnx_runtime import load_fp32
    from op_sensitivity.quantize.onnx_serving import export_serving, graph_inputs

    model, config = load_fp32(model_dir)(model_dir)
    where = work / "fp32_check"
    where.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = export_serving(model, config, batches[0], where / "model.onnx", is_large(model))
    out: dict = {"export_seconds": round(time.perf_counter() - start, 1), "max_abs_diff": []}
    sess = session(where / "model.onnx", threads=0)
    for b in batches:
        with torch.no_grad():
            ref = model(**b, use_cache=False).logits
        got = torch.from_numpy(sess.run(["logits"], graph_inputs(config, b, names))[0])
        out["max_abs_diff"].append(float((got - ref).abs().max()))
        out.setdefault("max_abs_logit", []).append(float(ref.abs().max()))
    del sess, model
    for f in where.iterdir():
        f.unlink()
    where.rmdir()
    gc.collect()
    return out


if __name__ == "__main__":
    main()
