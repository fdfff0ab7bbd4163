"""What the stored dtype does to the ModelOpt INT8 round trip at 3B size: the gap split by cause.

    python benchmarks/modelopt_dtype_3b.py --workdir /tmp/dag3b \\
        --out benchmarks/results/cpu-2026-12-04/modelopt_dtype_3b.json

``--workdir``: a DAG workdir whose ``quantize@modelopt_int8`` ran at 3B size (``benchmarks/whole_dag.py``:
its ``models/``, ``data/``, ``reports/`` and ``params.yaml``). On the test split, against the float32
reference, one after another (never two models held at once):

* the native prediction for the artifact's keep-list (``quantize.deploy``'s own ``_predict``);
* the float model as stored (bf16), nothing quantized: the stored dtype's cause alone, as the
  quantize stage measures it (``deploy.stored_dtype_causes``);
* the artifact in ModelOpt as the quantize stage loads it (in the stored dtype, bf16);
* the same artifact with the model upcast to float32 before ModelOpt restores its codes and scales
  (the prediction's arithmetic): what is left once the dtype is out.

The upcast is a benchmark-only swap of ``quantize.modelopt.load_model_dir`` (the stage always loads
as stored, as a deployment does). The float32 step holds ~15 GB of weights.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from op_sensitivity.engines.artifact import read_report
from op_sensitivity.engines.runner import host_facts
from op_sensitivity.params import load_params
from op_sensitivity.quantize import deploy, modelopt
from op_sensitivity.quantize.base import Inputs
from op_sensitivity.quantize.modelopt import ModeloptInt8
from op_sensitivity.validation.inputs import scored_and_excluded


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def upcast_to(dtype: torch.dtype) -> Iterator[None]:
    """ModelOpt's restored model built on the stored model cast to ``dtype``."""
    original = modelopt.load_model_dir

    def load(model_dir: Path):
        model, processor, card = original(model_dir)
        return model.to(dtype), processor, card

    modelopt.load_model_dir = load
    try:
        yield
    finally:
        modelopt.load_model_dir = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    os.chdir(args.workdir)
    params = load_params(Path("params.yaml"))
    target = ModeloptInt8()
    doc = json.loads(Path("reports/quantize/modelopt_int8.json").read_text())
    spectrum = Path(doc["artifact"]["spectrum"]["path"])
    report = read_report(spectrum)
    scored, _ = scored_and_excluded(report)
    keep = doc["kept"]
    dirs = {"model": Path("models/qwen2_5_vl"), "calibration": Path("data/calibration")}
    dirs["test"] = Path("data/test")
    sens = replace(params.sensitivity, native=replace(params.sensitivity.native, scheme=target.scheme))
    metric = params.curve.metric
    out: dict[str, Any] = {"keep": keep, "metric": metric}

    start = time.perf_counter()
    batch_size = params.curve.batch_size
    predicted, all_int8, scorer, calibration = deploy._predict(sens, batch_size, dirs, report, keep)
    out["predicted"], out["all_int8"] = predicted, all_int8
    out["seconds"] = {"predict": time.perf_counter() - start}
    print(f"predicted {metric} {predicted[metric]:.6g}", flush=True)

    start = time.perf_counter()
    _, [cause] = deploy.stored_dtype_causes(target, dirs["model"], "float32", scorer, metric)
    out["cause"] = {"name": cause.name, "value": cause.value, "how": cause.how}
    out["seconds"]["cause"] = time.perf_counter() - start
    print(f"{cause.name}: {metric} {cause.value:.6g}", flush=True)

    quantize = [m for m in scored if m not in set(keep)]
    inputs = Inputs(dirs["model"], quantize, calibration, Path("models/.modelopt_dtype_work"), 0)
    artifact = Path(doc["artifact"]["path"])
    for label, dtype in (("runtime_as_stored", None), ("runtime_float32", torch.float32)):
        start = time.perf_counter()
        with upcast_to(dtype) if dtype is not None else contextlib.nullcontext():
            runtime, measured, _ = deploy.measure_artifact(target, artifact, inputs, scorer, metric)
        out[label] = {
            "measured": measured,
            "ratio": measured[metric] / predicted[metric],
            "matmul": runtime.facts()["matmul"],
        }
        del runtime
        gc.collect()
        out["seconds"][label] = time.perf_counter() - start
        print(f"{label}: {metric} {measured[metric]:.6g}, ratio {out[label]['ratio']:.5g}", flush=True)

    expected = predicted[metric] + cause.value
    out["predicted_plus_cause"] = expected
    out["as_stored_over_predicted_plus_cause"] = out["runtime_as_stored"]["measured"][metric] / expected
    out["peak_rss_gib"] = _peak_gib()
    out["host"] = host_facts()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("keep", "host")}, indent=1))


if __name__ == "__main__":
    main()
