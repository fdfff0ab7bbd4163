"""Building the random full-size model (``model.source: full_size_random``, load_model's first
step) the plain way against ``full_size.init_like_transformers``: seconds, peak memory, and the
same weight distributions.

    python benchmarks/full_size_build.py [--size 3b] [--repeats 2] \\
        --out benchmarks/results/cpu-2026-12-05/full_size_build_3b.json

* ``plain``: ``Qwen2_5_VLForConditionalGeneration(config)`` under a seed, as load_model built it
  before: torch's ``reset_parameters`` (kaiming_uniform_ on every Linear and Conv) runs, and
  transformers' ``init_weights`` then overwrites every weight;
* ``transformers_only``: ``build_full_size_model`` as load_model builds it now: the model under
  transformers' ``no_init_weights``, then its ``init_weights`` alone.

Each build is one fresh process (the tokenizer trained on the repo's captions, then the timed
build and the bfloat16 cast); the kinds alternate; ratios are of the medians; the peak is the
process's resident set (``ru_maxrss``). The two kinds draw from the seed in a different order, so
their values differ; what must agree is each tensor kind's distribution (mean and std of one
vision and one text Linear, a bias, a norm, the embedding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from op_sensitivity.engines.runner import host_facts

REPO = Path(__file__).resolve().parents[1]
KINDS = ("transformers_only", "plain")
TENSORS = (
    "model.visual.blocks.0.attn.qkv.weight",
    "model.visual.blocks.0.attn.qkv.bias",
    "model.language_model.layers.0.mlp.up_proj.weight",
    "model.language_model.norm.weight",
    "model.language_model.embed_tokens.weight",
)
CHILD = """
import json, resource, sys, time
from pathlib import Path
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from op_sensitivity.data.calibration import load_calibration
from op_sensitivity.model.full_size import build_full_size_model, full_size_config
from op_sensitivity.model.tokenizer import train_tokenizer
kind, size, tensors = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
_, records = load_calibration(Path("data/calibration"))
tokenizer = train_tokenizer((r.caption for r in records), 512)
start = time.perf_counter()
if kind == "plain":
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(full_size_config(tokenizer, size))
    model = model.to(torch.bfloat16).eval()
else:
    model = build_full_size_model(tokenizer, 0, size)
seconds = time.perf_counter() - start
state = model.state_dict()
stats = {n: [round(state[n].float().mean().item(), 5), round(state[n].float().std().item(), 5)]
         for n in tensors}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"kind": kind, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2),
                  "params": sum(p.numel() for p in model.parameters()), "mean_std": stats}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="3b", choices=("3b", "7b"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    runs = []
    for i in range(a.repeats):
        for kind in KINDS:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, kind, a.size, json.dumps(TENSORS)],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO / "src")},
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(
                f"repeat {i + 1}/{a.repeats} {kind}: {runs[-1]['seconds']} s, {runs[-1]['peak_rss_gib']} GiB",
                flush=True,
            )
    median = {k: statistics.median(r["seconds"] for r in runs if r["kind"] == k) for k in KINDS}
    result = {
        "date": datetime.date.today().isoformat(),
        "size": a.size,
        "host": host_facts(),
        "torch": torch.__version__,
        "runs": runs,
        "median_seconds": median,
        "ratio_plain_over_transformers_only": round(median["plain"] / median["transformers_only"], 2),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_seconds", "ratio_plain_over_transformers_only")}))


if __name__ == "__main__":
    main()
