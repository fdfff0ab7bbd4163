"""The ModelOpt INT8 checkpoint's weight codes against float32 rounding of the stored weights.

    python benchmarks/modelopt_codes_3b.py --workdir /tmp/dag3b \\
        --out benchmarks/results/cpu-2026-12-04/modelopt_codes_3b.json

What ``benchmarks/modelopt_dtype_3b.py`` leaves once the dtype is out (the artifact upcast to
float32 against the prediction) is in the codes and scales. Per quantized Linear of the artifact in
``--workdir`` (``models/quantized/modelopt_int8``, written from ``models/qwen2_5_vl``): its codes
against ``round(w x 127 / amax_row)`` in float32 (per output row, what the ``modelopt_int8`` scheme
computes from the same bf16 weights upcast) and against the same product rounded in bf16; and its
stored ``weight_scale x 127`` against ``amax_row``. One tensor at a time (a few hundred MB).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from op_sensitivity.engines.runner import host_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    weights = args.workdir / "models/qwen2_5_vl/model.safetensors"
    artifact = args.workdir / "models/quantized/modelopt_int8"
    totals = {"modules": 0, "codes": 0, "differ_float32": 0, "differ_bf16_product": 0}
    largest, scale_moved = 0, 0.0
    with safe_open(str(weights), "pt") as source:
        names = set(source.keys())
        for f in sorted(artifact.glob("*.safetensors")):
            with safe_open(str(f), "pt") as quantized:
                scales = [k for k in quantized.keys() if k.endswith(".weight_scale")]  # noqa: SIM118
                for key in tqdm(scales, desc=f.name):
                    base = key.removesuffix(".weight_scale")
                    stored = base.replace("model.layers.", "model.language_model.layers.") + ".weight"
                    w = source.get_tensor(stored if stored in names else base + ".weight")
                    codes = quantized.get_tensor(base + ".weight").to(torch.int32)
                    amax = w.float().abs().amax(dim=1, keepdim=True)
                    native = torch.round(w.float() * (127.0 / amax)).clamp(-128, 127).to(torch.int32)
                    in_bf16 = torch.round(w * (127.0 / amax).to(w.dtype)).clamp(-128, 127).to(torch.int32)
                    scale = quantized.get_tensor(key).float().reshape(-1, 1)
                    totals["modules"] += 1
                    totals["codes"] += codes.numel()
                    totals["differ_float32"] += int((codes != native).sum())
                    totals["differ_bf16_product"] += int((codes != in_bf16).sum())
                    largest = max(largest, int((codes - native).abs().max()))
                    scale_moved = max(scale_moved, float((scale * 127 / amax - 1).abs().max()))
    out = {
        **totals,
        "fraction_differ_float32": totals["differ_float32"] / totals["codes"],
        "fraction_differ_bf16_product": totals["differ_bf16_product"] / totals["codes"],
        "largest_code_difference": largest,
        "largest_relative_scale_x_127_vs_amax": scale_moved,
        "host": host_facts(),
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "host"}, indent=1))


if __name__ == "__main__":
    main()
