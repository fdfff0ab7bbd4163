"""Each deployment scheme's spectrum against the real library's own quantized model, and its cost.

    make repro && python benchmarks/schemes.py --out benchmarks/results/schemes-<date>.json

Two configs: the embedded default (``models/qwen2_5_vl``, ``data/calibration`` from ``make repro``)
and a second small one built here (3 decoder layers, 2 vision blocks, other widths). Per scheme
and config, on the first calibration batch (one confidence batch, batch size 1):

* ours: the native engine under the scheme (``sensitivity.native.scheme``), fake-quant and, for
  the symmetric schemes, the kernel arithmetic (``int8_kernels`` / ``fp8_kernels``);
* the library's: the same trials on the library's own quantized model
  (tests/schemes/library_spectra.py: ModelOpt ``mtq.quantize`` with quantizers disabled per
  module, compressed-tensors' W8A8 lifecycle; tests/schemes/ort_spectrum.py: ``quantize_static``
  with ``nodes_to_exclude`` on a ``torch.onnx`` export, run by ONNX Runtime);
* the comparison per phase (``report.comparison.compare_phase``: Spearman, median and max
  relative difference; requant on the increments of the cumulative curve), and the all-int8
  error's relative difference.

Planted outlier (``--planted``): one MLP channel x1000 in up_proj and its down_proj column / 1000
(fp32 unchanged; tests/validation/planted.py) in the embedded default; per scheme the all-int8
error with and without it and the top ops of the isolated requant phase (each op int8 alone),
lm_head kept fp32.

Cost: seconds of our pass (both phases, the params' confidence batches) per scheme on the
embedded default, median of ``--repeats`` runs. Machine and versions go into the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the library references live beside the tests that check them

from engines import _machine, _table  # noqa: E402  (this directory is on sys.path as a script)

from op_sensitivity.engines.artifact import build_report  # noqa: E402
from op_sensitivity.engines.contract import VISION_FP32  # noqa: E402
from op_sensitivity.engines.runner import load_inputs, run_engine  # noqa: E402
from op_sensitivity.inventory import op_inventory, write_inventory  # noqa: E402
from op_sensitivity.model.fused import fused_groups, probe_batch  # noqa: E402
from op_sensitivity.model.source import materialize_model  # noqa: E402
from op_sensitivity.params import TinyModelParams, load_params  # noqa: E402
from op_sensitivity.phases import FALLBACK, PHASES, REQUANT  # noqa: E402
from op_sensitivity.report.comparison import compare_phase  # noqa: E402
from tests.schemes.library_spectra import compressed_tensors_spectrum, modelopt_spectrum  # noqa: E402
from tests.schemes.ort_spectrum import ort_spectrum  # noqa: E402

SECOND = TinyModelParams(
    text={
        "hidden_size": 128,
        "intermediate_size": 320,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    vision={"depth": 2, "hidden_size": 64, "intermediate_size": 160, "num_heads": 2},
    vocab_size=512,
)
KERNELS = {
    "modelopt_int8": "int8_kernels",
    "llmcompressor_w8a8": "int8_kernels",
    "modelopt_fp8": "fp8_kernels",
}


def build_second(params, work: Path) -> Path:
    model_params = replace(params.model, tiny=SECOND, input=REPO / "data/calibration")
    out = work / "second" / "qwen2_5_vl"
    model, processor, card = materialize_model(model_params, out)
    groups = fused_groups(model, probe_batch(processor))
    write_inventory(op_inventory(model, groups), card.model_type, out.parent / "op_inventory.json")
    return out


def library(scheme: str, model, batch, scored: list[str], work: Path) -> dict:
    if scheme == "modelopt_int8":
        return modelopt_spectrum(model, batch, scored, "lm_head", "INT8_DEFAULT_CFG")
    if scheme == "modelopt_fp8":
        return modelopt_spectrum(model, batch, scored, "lm_head", "FP8_DEFAULT_CFG")
    if scheme == "llmcompressor_w8a8":
        return compressed_tensors_spectrum(model, batch, scored, "lm_head")
    return ort_spectrum(model, batch, scored, "lm_head", work)


def as_report(spectrum: dict, like: dict) -> dict:
    """The library's values in our report's shape, so one comparison reads both."""
    doc = json.loads(json.dumps(like))
    for phase in PHASES:
        for op in doc["phases"][phase]["ops"]:
            value = spectrum[phase][op["module"]]
            op["mse"], op["mse_per_batch"] = value, [value]
    doc["metadata"]["all_int8_mse"] = spectrum["all_int8"]
    return doc


def inventory_of(model_dir: Path) -> Path:
    """``make repro`` writes the inventory under reports/; the second config beside its model."""
    beside = model_dir.parent / "op_inventory.json"
    return beside if beside.exists() else REPO / "reports/model/op_inventory.json"


def ours(sens, scheme: str, arithmetic: str, model_dir: Path, work: Path) -> tuple[dict, float, list]:
    params = replace(sens, engine="native", native=replace(sens.native, scheme=scheme, arithmetic=arithmetic))
    model, spec, inventory, meta = load_inputs(
        params, REPO / "data/calibration", model_dir, inventory_of(model_dir)
    )
    start = time.perf_counter()
    result = run_engine("native", model, spec, Path(tempfile.mkdtemp(dir=work)))
    seconds = time.perf_counter() - start
    return build_report(result, inventory, meta), seconds, spec


def agreement(sens, scheme: str, model_dir: Path, work: Path) -> list[dict]:
    one = replace(sens, confidence_batches=1, batch_size=1)
    rows = []
    runs = [("fake_quant", "all")] + ([(KERNELS[scheme], "all")] if scheme in KERNELS else [])
    if scheme == "llmcompressor_w8a8":
        # compressed-tensors' TOKEN strategy gives a 2-D activation (the vision tower's) one scale,
        # where the per-token kernel vLLM runs gives one per row: the text tower alone isolates it
        runs.append(("fake_quant", "text"))
    for arithmetic, towers in runs:
        if towers == "text":
            one = replace(one, op_name_dict={**one.op_name_dict, **VISION_FP32})
        report, _, spec = ours(one, scheme, arithmetic, model_dir, work)
        scored = [o["module"] for o in report["phases"][FALLBACK]["ops"]]
        model, spec, _, _ = load_inputs(
            replace(one, engine="native", native=replace(one.native, scheme=scheme)),
            REPO / "data/calibration",
            model_dir,
            inventory_of(model_dir),
        )
        start = time.perf_counter()
        lib = library(scheme, model.float().eval(), spec.batches[0], scored, Path(tempfile.mkdtemp(dir=work)))
        lib_seconds = time.perf_counter() - start
        theirs = as_report(lib, report)
        mine, ref = report["metadata"]["all_int8_mse"], lib["all_int8"]
        rows.append(
            {
                "scheme": scheme,
                "arithmetic": arithmetic,
                "towers": towers,
                "ops": len(scored),
                "all_int8": {"ours": mine, "library": ref, "rel_diff": abs(mine - ref) / ref},
                "library_seconds": lib_seconds,
                **{p: compare_phase(report, theirs, p) for p in (FALLBACK, REQUANT)},
            }
        )
    return rows


def cost(sens, scheme: str, model_dir: Path, work: Path, repeats: int) -> dict:
    times = [ours(sens, scheme, "auto", model_dir, work)[1] for _ in range(repeats)]
    return {"scheme": scheme, "seconds": times, "median_seconds": statistics.median(times)}


def planted(sens, schemes: list[str], work: Path) -> list[dict]:
    from op_sensitivity.engines.contract import FP32
    from op_sensitivity.report.scores import phase_scores
    from tests.validation.planted import planted_copy

    src = REPO / "models/qwen2_5_vl"
    out = planted_copy(src, REPO / "reports/model/op_inventory.json", work / "planted" / "qwen2_5_vl")
    rows = []
    for scheme in schemes:
        params = replace(
            sens,
            engine="native",
            op_name_dict={"lm_head": FP32},
            native=replace(sens.native, scheme=scheme, requant_mode="isolated"),
        )
        row = {"scheme": scheme}
        for label, model_dir in (("clean", src), ("planted", out)):
            model, spec, inventory, meta = load_inputs(
                params, REPO / "data/calibration", model_dir, inventory_of(model_dir)
            )
            report = build_report(
                run_engine("native", model, spec, Path(tempfile.mkdtemp(dir=work))), inventory, meta
            )
            row[label] = report["metadata"]["all_int8_mse"]
            row[f"{label}_top3"] = list(phase_scores(report, inventory)[REQUANT]["module"][:3])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--schemes", default="modelopt_int8,modelopt_fp8,llmcompressor_w8a8,ort_qdq")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--planted", action="store_true", help="only the planted-outlier damage per scheme")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(args.params)
    sens = params.sensitivity
    schemes = args.schemes.split(",")
    work = Path(tempfile.mkdtemp(prefix="schemes_bench_"))
    if args.planted:
        rows = planted(sens, ["inc_cpu", *schemes], work)
        _table(
            ["scheme", "all-int8 clean", "planted", "ratio", "top 3 (isolated requant)"],
            [
                [
                    r["scheme"],
                    f"{r['clean']:.4g}",
                    f"{r['planted']:.4g}",
                    f"{r['planted'] / r['clean']:.1f}",
                    ", ".join(r["planted_top3"]),
                ]
                for r in rows
            ],
        )
        if args.out:
            args.out.write_text(json.dumps({"machine": _machine(), "planted": rows}, indent=2) + "\n")
        return
    configs = {"embedded_default": REPO / "models/qwen2_5_vl", "second": build_second(params, work)}
    rows = [
        {"config": name, **row}
        for name, model_dir in configs.items()
        for scheme in schemes
        for row in agreement(sens, scheme, model_dir, work)
    ]
    costs = [cost(sens, s, configs["embedded_default"], work, args.repeats) for s in ["inc_cpu", *schemes]]
    _table(
        [
            "config",
            "scheme",
            "arithmetic",
            "towers",
            "ops",
            "fallback Spearman",
            "fb median rel",
            "requant Spearman",
            "rq median rel",
            "all-int8 rel",
        ],
        [
            [
                r["config"],
                r["scheme"],
                r["arithmetic"],
                r["towers"],
                r["ops"],
                f"{r[FALLBACK]['spearman']:.4f}",
                f"{r[FALLBACK]['median_rel_diff']:.2e}",
                f"{r[REQUANT]['spearman']:.4f}",
                f"{r[REQUANT]['median_rel_diff']:.2e}",
                f"{r['all_int8']['rel_diff']:.2e}",
            ]
            for r in rows
        ],
    )
    _table(["scheme", "median s (2 phases)"], [[c["scheme"], f"{c['median_seconds']:.3f}"] for c in costs])
    doc = {"machine": _machine(), "torch": torch.__version__, "agreement": rows, "cost": costs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
