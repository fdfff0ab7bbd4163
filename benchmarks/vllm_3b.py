"""vLLM serving a full-size 3B compressed-tensors checkpoint on this CPU, beside the native prediction.

    python benchmarks/vllm_3b.py --workdir /tmp/dag3b_8 --keep model.language_model.layers.0.mlp.down_proj \\
        --out benchmarks/results/cpu-2026-12-02/vllm_3b.json

``--workdir``: a DAG workdir whose ``load_model`` ran at 3B size (``benchmarks/whole_dag.py``: its
``models/qwen2_5_vl``, ``data/`` and ``params.yaml``). Writes the W8A8 checkpoint of that model with
``--keep`` (fused groups whole: name one member) and ``lm_head`` left float, as the quantize stage's
``compressed_tensors`` target writes it (``quantize.compressed_tensors.write_checkpoint``, with its
``op_sensitivity_source.json``), then runs ``scripts/serve_vllm.py`` on it; the peak resident set of
each step is read from the kernel (``getrusage``), the vLLM process's included.

``--layers N``: first build, beside the workdir, a copy whose model has the same published widths
but only N decoder layers (and one vision block, which vLLM does not serve here): the same
params, data and tokenizer (trained on the same captions), weights seeded the same way, its
inventory written as ``load_model`` writes it. A depth sweep then shows how the gap and its
named causes grow through the random layers:

    python benchmarks/vllm_3b.py --workdir /tmp/dag3b_pos --layers 2 \
        --keep model.language_model.layers.0.self_attn.o_proj \
        --out benchmarks/results/cpu-2026-12-04/vllm_3b_width_2layers.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from op_sensitivity.inventory import read_inventory
from op_sensitivity.quantize.compressed_tensors import write_checkpoint
from op_sensitivity.quantize.hf_checkpoint import linear_modules

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument(
        "--keep", action="append", default=[], help="a module to keep float (its fused group whole)"
    )
    ap.add_argument("--artifact", type=Path, help="where to write the checkpoint (default: in the workdir)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=0, help="decoder layers of a cut copy (0: the model as is)")
    args = ap.parse_args()
    work = carved_workdir(args.workdir, args.layers) if args.layers else args.workdir
    model_dir = work / "models" / "qwen2_5_vl"
    artifact = args.artifact or work / "models" / "quantized" / "compressed_tensors_vllm"
    inventory = read_inventory(work / "reports" / "model" / "op_inventory.json")
    groups = {o.name: o.fused_group for o in inventory}
    keep = sorted(
        {
            o.name
            for o in inventory
            for k in args.keep
            if o.name == k or (groups.get(k) and o.fused_group == groups[k])
        }
    )
    linear = linear_modules(model_dir)
    scored = [n for n in linear if n != "lm_head"]  # llmcompressor_w8a8 scores every Linear but lm_head
    if not set(keep) <= set(scored):
        sys.exit(f"--keep: {sorted(set(keep) - set(scored))} are not Linears the scheme scores")
    start = time.perf_counter()
    record = write_checkpoint(model_dir, [*keep, "lm_head"], artifact)
    written = time.perf_counter() - start
    quantize = [n for n in scored if n not in set(keep)]
    source = {
        "target": "compressed_tensors",
        "scheme": "llmcompressor_w8a8",
        "quantize": quantize,
        "keep": keep,
    }
    (artifact / "op_sensitivity_source.json").write_text(json.dumps(source, indent=2))
    peak_write = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    served = args.out.with_suffix(".serve.json")
    serve = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "serve_vllm.py"),
            "--params", str(work / "params.yaml"),
            "--artifact", str(artifact),
            "--model", str(model_dir),
            "--calibration", str(work / "data" / "calibration"),
            "--test", str(work / "data" / "test"),
            "--out", str(served),
        ],
        check=False,  # exit 1 is a finding (kept layers or the gap's causes): record it with the rest
    )  # fmt: skip
    result = {
        "model": str(model_dir),
        "layers": args.layers or "all",
        "keep": keep,
        "checkpoint": {"bytes": record["bytes"], "seconds": written, "dtype": record["dtype"]},
        "peak_rss_gib": {
            "write": peak_write,
            "serve_vllm (native prediction and both vLLM processes)": resource.getrusage(
                resource.RUSAGE_CHILDREN
            ).ru_maxrss
            / 2**20,
        },
        "serve_seconds": time.perf_counter() - start,
        "serve_vllm_exit_code": serve.returncode,
        **json.loads(served.read_text()),
    }
    served.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("w8a8", "float", "all_int8", "float_layers")}, indent=1))


def carved_workdir(work: Path, layers: int) -> Path:
    """``work``'s params and data with a model of the same widths and ``layers`` decoder layers."""
    from dataclasses import replace

    from op_sensitivity.inventory import op_inventory, write_inventory
    from op_sensitivity.model.carve import carved_full_size
    from op_sensitivity.model.fused import fused_groups, probe_batch
    from op_sensitivity.model.source import materialize_model
    from op_sensitivity.params import load_params

    out = work.parent / f"{work.name}_{layers}layers"
    model_dir = out / "models" / "qwen2_5_vl"
    if model_dir.exists():
        return out
    out.mkdir(exist_ok=True)
    (out / "params.yaml").write_text((work / "params.yaml").read_text())
    if not (out / "data").exists():
        (out / "data").symlink_to((work / "data").resolve())
    params = load_params(work / "params.yaml").model
    with carved_full_size(layers, 1):
        model, processor, card = materialize_model(replace(params, input=work / params.input), model_dir)
    groups = fused_groups(model, probe_batch(processor))
    inventory = out / "reports" / "model" / "op_inventory.json"
    inventory.parent.mkdir(parents=True, exist_ok=True)
    write_inventory(op_inventory(model, groups), card.model_type, inventory)
    return out


if __name__ == "__main__":
    main()
