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
from op_sensitivity.quantize.base import Inputs, dir_bytes
from op_sensitivity.quantize.hf_checkpoint import meta_model
from op_sensitivity.quantize.targets import TARGETS
from op_sensitivity.schemes import load as load_scheme

BUILD = """
import sys
from dataclasses import replace
from pathlib import Path
from op_sensitivity.model.source import materialize_model
from op_sensitivity.params import load_params
model = replace(load_params('params.yaml').model, source='full_size_random', full_size=sys.argv[2],
                input=Path('data/calibration'))
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
    args = ap.parse_args()
    model_dir, out_dir = args.work / "model", args.work / args.target
    record: dict = {
        "machine": _machine(),
        "size": args.size,
        "target": args.target,
        "torch_threads": torch.get_num_threads(),
    }
    if not model_dir.exists():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", BUILD, str(model_dir), args.size], check=True)
        record["build_model_dir_seconds"] = round(time.perf_counter() - start, 1)
    record["model_dir_bytes"] = dir_bytes(model_dir)
    target = TARGETS[args.target]()
    quantize = scheme_ops(model_dir, target.scheme)
    inputs = Inputs(model_dir, quantize, [_one_batch(model_dir)], args.work, 10**12)
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


def _one_batch(model_dir: Path) -> dict[str, torch.Tensor]:
    """One random 448x448 image and a caption through the model directory's own processor."""
    import numpy as np
    from PIL import Image

    from op_sensitivity.model.processor import ImageTextProcessor

    processor = ImageTextProcessor.load(model_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    return processor.encode(["A red circle on a blue background."], [image])


if __name__ == "__main__":
    main()
