"""The pass runner: stage inputs -> a validated :class:`PassSpec` -> the chosen engine -> artifacts.

Glue only. Each phase x batch's values are persisted as they land (a long run that dies keeps
what it measured in ``<workspace>/partial_capture.json``, ``{"run": {...}, "calls": [...]}``, the
run named by engine, params, model and calibration fingerprints and start time); the report is
written atomically.

Runtime file (``--runtime``, e.g. ``reports/runtime/sensitivity.json``), a DVC metric that no
stage hashes or reads, so timings never change a versioned artifact. Its two top-level numbers
are what ``dvc metrics show`` prints (lists are not shown); each pass's details follow::

    {"seconds": float (the passes' measured seconds, summed),
     "peak_gib": float (the largest peak: GPU memory of a cuda pass, else resident memory),
     "passes": [RuntimeDoc]}     one pass (sensitivity); the crosscheck's: one per engine run

RuntimeDoc (:func:`runtime_doc`)::

    {"engine": str, "seconds": {fallback, requant[, refine]}, "seconds_per_op": float | null,
     "calibration_seconds": float (native: observers + float32 reference, once per batch; part of
                            seconds.fallback),
     "peak_rss_gib" | "peak_gpu_memory_gib": float, "peak_rss_scope": "pass" | "process",
     "rss_at_start_gib": float (native: before the pass),
     "ops", "batches": int (scored ops, confidence batches), "model_params": int, "device": str,
     "trials_resumed": int (native: taken from a killed run's trial log),
     "blocks_reused", "blocks_run": int (native: decoder layers / vision blocks skipped, computed),
     "trials_batched": int (native: fallback trials measured several per forward),
     "processes": int (native, sharded passes only),
     "host": {machine, cpu, cpu_count, torch_threads, gpu}}
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import dump_json
from ..cli import raise_if_terminated
from ..data.calibration import load_calibration
from ..errors import InputError
from ..inventory import OpInfo, check_ops_in_model, op_inventory, read_inventory
from ..model.batches import build_batches
from ..model.carve import Carve, batch_tokens, load_carved
from ..model.processor import ImageTextProcessor
from ..model.source import load_model_dir, read_card
from ..params import SchemesParams, SensitivityParams
from ..phases import FALLBACK
from ..schemes import load as load_scheme
from . import cpu_kind
from .artifact import build_report, write_report
from .contract import Capture, Engine, PassResult, PassSpec, build_spec, check_op_dicts
from .schemed import kernel_for

log = logging.getLogger(__name__)

PARTIAL = "partial_capture.json"


def engine(name: str) -> Engine:
    """The engine's ``run_pass``; imported on demand (INC is heavy, and the native path needs no INC).

    INC's own imports (seconds: its data transforms load OpenCV) happen here, before the pass
    announces itself in the partial file: a kill that lands in the middle of an import would
    surface as an ImportError, which is not what the user did.
    """
    if name == "inc":
        from .inc_loop import inc_util, run_pass

        inc_util()
    else:
        from .native import run_pass
    return run_pass


def run_engine(
    name: str, model: nn.Module, spec: PassSpec, workspace: Path, run: dict[str, Any] | None = None
) -> PassResult:
    """One pass of engine ``name``, persisting each phase x batch's values under ``workspace``.

    The partial file is replaced when the pass starts, and every version of it names the run it
    belongs to (``run``: engine, params, model and calibration fingerprints, start time), so a
    killed run's values are never mixed with, or taken for, another run's.
    """
    workspace.mkdir(parents=True, exist_ok=True)
    partial = workspace / PARTIAL
    header = {"engine": name, "started": datetime.now(timezone.utc).isoformat(), "pid": os.getpid()}
    header.update(run or {})

    def persist(capture: Capture) -> None:
        dump_json({"run": header, "calls": [asdict(c) for c in capture.calls]}, partial)

    run_pass = engine(name)
    persist(Capture())
    result = run_pass(model, spec, workspace=workspace, on_call=persist)
    raise_if_terminated()  # a kill swallowed by library code: no output from an interrupted pass
    return result


def run_fingerprint(params: SensitivityParams, metadata: dict[str, Any]) -> dict[str, Any]:
    """What identifies a pass's inputs: its params block, the model's hash and the calibration used."""
    return {
        "params": asdict(params),
        "model_sha256": metadata["model"]["sha256"],
        "calibration": metadata["calibration"],
    }


def _calibration_records(params: SensitivityParams, cal_dir: Path) -> tuple[Any, list, dict[str, Any]]:
    """The records a pass uses (the first confidence_batches x batch_size) and how they are described."""
    meta, records = load_calibration(cal_dir)
    needed = params.confidence_batches * params.batch_size
    if len(records) < needed:
        raise InputError(
            f"{params.where('confidence_batches')} x batch_size = {needed} samples needed, "
            f"the calibration sample {cal_dir} has {len(records)} (raise captions.count)"
        )
    calibration = {
        "mode": meta.mode,
        "manifest_records": len(records),
        "samples_used": needed,
        "batch_size": params.batch_size,
        "confidence_batches": params.confidence_batches,
        "annotations": meta.annotations,
        "annotations_sha256": meta.annotations_sha256,
    }
    return meta, records[:needed], calibration


def load_inputs(
    params: SensitivityParams,
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
) -> tuple[nn.Module, PassSpec, list[OpInfo], dict[str, Any]]:
    """Model, validated pass spec (first confidence_batches x batch_size records), inventory, metadata."""
    meta, used, calibration = _calibration_records(params, cal_dir)
    inventory = read_inventory(inventory_path)
    check_op_dicts(params, inventory, inventory_path)  # a key matching no op: before the model loads
    model, processor, card = load_model_dir(model_dir)
    check_ops_in_model(inventory, model, inventory_path)  # before any pass, trial log or partial file
    batches = build_batches(used, cal_dir, processor, meta.mode, params.batch_size)
    spec = replace(build_spec(params, inventory, batches, meta.mode), model_sha256=card.sha256)
    return model, spec, inventory, {"model": asdict(card), "calibration": calibration}


def load_carved_inputs(
    params: SensitivityParams,
    cal_dir: Path,
    model_dir: Path,
    layers: int,
    vision_blocks: int,
    cut_vocab: bool = True,
) -> tuple[nn.Module, PassSpec, list[OpInfo], dict[str, Any], Carve]:
    """As :func:`load_inputs`, on the carved copy of the model (``model.carve``), the same batches.

    The spec scores what ``params`` say of the carved copy's ops (its module names are the full
    model's); its ``model_sha256`` names the source weights and the cut, so a resumed native
    pass never takes values of another carve.
    """
    meta, used, calibration = _calibration_records(params, cal_dir)
    processor = ImageTextProcessor.load(model_dir)
    batches = build_batches(used, cal_dir, processor, meta.mode, params.batch_size)
    model, carve = load_carved(model_dir, layers, vision_blocks, batch_tokens(batches) if cut_vocab else None)
    batches = [carve.remap(b) for b in batches]
    inventory = op_inventory(model)
    sha = f"{carve.source_sha256}:carved:{carve.decoder_layers}x{carve.vision_blocks}x{carve.vocab}"
    spec = replace(build_spec(params, inventory, batches, meta.mode), model_sha256=sha)
    card = asdict(read_card(model_dir))
    return (
        model,
        spec,
        inventory,
        {"model": {**card, "carve": carve.as_dict()}, "calibration": calibration},
        carve,
    )


# CPU features that decide which int8 / float kernels run (oneDNN's ISA, INC's reduce_range from
# VNNI), so the last bits of a value: two machines with the same ones give the same bytes.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def host_facts() -> dict[str, Any]:
    """Where a runtime was measured: a number means little without the machine. ``isa`` is the
    machine kind for reproducibility: the same one gives the same artifact bytes (``cpu``, a model
    name, may be masked by a VM)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    flags = cpu_kind.cpu_flags(cpuinfo)
    isa = [torch.backends.cpu.get_cpu_capability(), *(f for f in ISA_FLAGS if f in flags)]
    if cpu_kind.emulated_cpu() == "avx2":  # the kind the values follow, not the silicon's
        isa = [torch.backends.cpu.get_cpu_capability(), "avx2", "(emulated: OP_SENSITIVITY_EMULATE_CPU)"]
    return {
        "machine": platform.machine(),
        "cpu": cpu,
        "isa": " ".join(isa),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def runtime_doc(result: PassResult, model_params: int | None = None) -> dict[str, Any]:
    """The runtime file of a pass. ``ops``, ``batches``, ``model_params`` and ``host`` let the plan
    (``op_sensitivity.plan``) reuse its seconds per op for the same model on the same machine."""
    seconds = {k: round(v, 3) for k, v in result.runtime.get("seconds", {}).items()}
    doc: dict[str, Any] = {"engine": result.engine, "seconds": seconds}
    ops = len(result.op_order) - len(result.excluded)
    batches = len(result.capture.phase(FALLBACK))
    per_op = result.runtime.get("seconds_per_op")
    if per_op is None and ops and batches and seconds:
        per_op = sum(result.runtime["seconds"].values()) / (2 * batches * ops)
    doc["seconds_per_op"] = round(per_op, 6) if per_op is not None else None
    doc.update(ops=ops, batches=batches, model_params=model_params)
    if result.details.get("device"):
        doc["device"] = result.details["device"]
    if result.runtime.get("calibration_seconds"):  # native: once per batch, inside seconds.fallback
        doc["calibration_seconds"] = round(sum(result.runtime["calibration_seconds"]), 3)
    memory = ("peak_rss_gib", "peak_rss_scope", "peak_gpu_memory_gib", "rss_at_start_gib")
    for key in (*memory, "trials_resumed", "blocks_reused", "blocks_run", "trials_batched", "processes"):
        if key in result.runtime:
            doc[key] = result.runtime[key]
    if "peak_rss_gib" not in doc:
        doc["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        doc["peak_rss_scope"] = "process"
    doc["host"] = host_facts()
    return doc


def runtime_file(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """The runtime file of a stage from its passes' :func:`runtime_doc` (module doc)."""
    seconds = sum(sum(p["seconds"].values()) for p in passes)
    peak = max(p.get("peak_gpu_memory_gib") or p["peak_rss_gib"] for p in passes)
    return {"seconds": round(seconds, 3), "peak_gib": peak, "passes": passes}


def scheme_params(params: SensitivityParams, name: str, schemes: SchemesParams) -> SensitivityParams:
    """The pass of stage scheme_sensitivity: the native engine under scheme ``name``.

    ``schemes.arithmetic: kernels`` picks the scheme's own low-precision matmul where it has one
    (symmetric int8: ``torch._int_mm``; fp8: ``torch._scaled_mm``; inc_cpu: torch's quantized
    modules as ``auto`` does) and fake-quant elsewhere (ONNX Runtime's asymmetric activations);
    the report's ``engine_details.arithmetic`` says which ran.
    """
    scheme = load_scheme(name, schemes.where("run"))
    arithmetic = "fake_quant" if name != "inc_cpu" else "auto"
    if schemes.arithmetic == "kernels" and name != "inc_cpu":
        arithmetic = kernel_for(scheme) or "fake_quant"
    native = replace(params.native, scheme=name, arithmetic=arithmetic)
    return replace(params, engine="native", native=native)


def run_sensitivity(
    params: SensitivityParams,
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
    out_json: Path,
    metrics_json: Path,
    runtime_json: Path | None,
    workspace: Path,
) -> dict:
    if params.engine == "inc":
        # INC reads no sensitivity.native, but the crosscheck, curve and validate measure with it: a
        # value this machine cannot run (device, arithmetic) is refused now, not after the INC pass
        from .numerics import resolve_numerics

        resolve_numerics(params)
    elif params.native.processes > 1:  # more than this machine's cores or GPUs: before the model loads
        from .numerics import check_native_processes

        check_native_processes(params)
    model, spec, inventory, metadata = load_inputs(params, cal_dir, model_dir, inventory_path)
    result = run_engine(params.engine, model, spec, workspace, run_fingerprint(params, metadata))
    report = build_report(result, inventory, metadata)
    write_report(report, out_json, metrics_json)
    if runtime_json is not None:
        dump_json(runtime_file([runtime_doc(result, metadata["model"]["params"])]), runtime_json)
    log.info(
        "wrote %s (%s engine): %s",
        out_json,
        params.engine,
        json.dumps({p: len(v["ops"]) for p, v in report["phases"].items()}),
    )
    return report
