"""Suffix reuse side by side: the same native pass with ``suffix_reuse`` off and on, in one process.

    python benchmarks/suffix_reuse.py                     # 8 decoder layers, 4 vision blocks, CPU
    python benchmarks/suffix_reuse.py --layers 16 --device cuda --out suffix.json

A random Qwen2.5-VL at reduced width (``--hidden``) but with ``--layers`` decoder layers and
``--blocks`` vision blocks (seeded, bf16 weights like the checkpoints), one confidence batch of
``--batch`` samples (``--pixels`` square image + a caption). The passes alternate (off, on, off,
on, ... ``--repeats`` times each) so drift in the machine's speed hits both; each pass's values
must equal the first's bit for bit, or the script stops. Reports seconds per trial (phase
seconds / scored ops, calibration included as in every pass) per phase and the ratio off / on,
with the blocks reused and run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from engines import _machine, _table, full_size_inputs  # this directory is on sys.path as a script

from op_sensitivity.engines.contract import build_spec
from op_sensitivity.engines.native import run_pass
from op_sensitivity.params import TinyModelParams, load_params
from op_sensitivity.phases import FALLBACK, REQUANT


def sizes(hidden: int, layers: int, blocks: int) -> TinyModelParams:
    heads = max(hidden // 128, 2)
    return TinyModelParams(
        text={
            "hidden_size": hidden,
            "intermediate_size": hidden * 11 // 4,  # the 3B's ratio (2048 -> 11008, rounded)
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(heads // 4, 1),
        },
        vision={"depth": blocks, "hidden_size": 256, "intermediate_size": 1024, "num_heads": 4},
        vocab_size=400,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pixels", type=int, default=224)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requant-mode", default="cumulative", choices=("cumulative", "isolated"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model, batches, inventory = full_size_inputs(
        args.batch, 0, sizes=sizes(args.hidden, args.layers, args.blocks), pixels=args.pixels
    )
    base = load_params(args.params).sensitivity
    native = replace(base.native, device=args.device, arithmetic="fake_quant", requant_mode=args.requant_mode)
    params = replace(base, confidence_batches=1, batch_size=args.batch, max_ops=10_000, native=native)
    spec = build_spec(params, inventory, batches, "image_caption")
    n_ops = len(spec.scored)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    reference = None
    for _ in range(args.repeats):
        for reuse in (False, True):
            run_spec = replace(spec, params=replace(params, native=replace(native, suffix_reuse=reuse)))
            result = run_pass(model, run_spec)
            values = ([c.main for c in result.capture.calls], result.all_int8_mse)
            if reference is None:
                reference = values
            elif values != reference:
                raise SystemExit(f"suffix_reuse={reuse}: values differ from the first pass")
            rt = result.runtime
            runs[reuse].append(
                {
                    **{p: rt["seconds"][p] / n_ops for p in (FALLBACK, REQUANT)},
                    "blocks_reused": rt["blocks_reused"],
                    "blocks_run": rt["blocks_run"],
                }
            )
            print(json.dumps({"suffix_reuse": reuse, **runs[reuse][-1]}), flush=True)
    summary = {
        reuse: {p: statistics.median(r[p] for r in rs) for p in (FALLBACK, REQUANT)}
        for reuse, rs in runs.items()
    }
    doc = {
        "machine": _machine(),
        "model": f"Qwen2.5-VL, random bf16 weights, text hidden {args.hidden} x {args.layers} layers, "
        f"vision 256 x {args.blocks} blocks",
        "ops": n_ops,
        "batch": f"{args.batch} x ({args.pixels}x{args.pixels} image + caption), "
        f"{batches[0]['input_ids'].shape[1]} tokens",
        "requant_mode": args.requant_mode,
        "values_identical": True,
        "s_per_trial_median": {("on" if k else "off"): v for k, v in summary.items()},
        "speedup": {p: summary[False][p] / summary[True][p] for p in (FALLBACK, REQUANT)},
        "runs": {("on" if k else "off"): v for k, v in runs.items()},
    }
    print(f"machine: {doc['machine']}; {doc['model']}; {n_ops} ops; {doc['batch']}")
    _table(
        ["phase", "s/trial, reuse off", "s/trial, reuse on", "speedup"],
        [
            [p, f"{summary[False][p]:.4f}", f"{summary[True][p]:.4f}", f"{doc['speedup'][p]:.2f}x"]
            for p in (FALLBACK, REQUANT)
        ],
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
