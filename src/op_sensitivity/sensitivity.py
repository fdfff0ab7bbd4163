"""Stage sensitivity: calibration sample + model directory -> ``op_sensitivity.json`` + metrics.

Glue only: builds the calibration batches, runs the chosen engine (``inc_engine``'s forced pass,
or ``native_engine``), persists each INC helper call's values as it lands (a long run that dies
keeps what it measured in ``<workspace>/partial_capture.json``), and writes the validated report
atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from .atomic import dump_json
from .calibration import CalibrationLoader, build_batches
from .coco_captions import load_calibration
from .errors import InputError
from .inventory import OpInfo, read_inventory
from .model_source import load_model_dir
from .params import SensitivityParams
from .pass_result import Capture, PassResult
from .sensitivity_report import build_report, write_report

log = logging.getLogger(__name__)


VISION_FP32 = {"model\\.visual\\..*": {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}}


def run_engine(
    engine: str,
    params: SensitivityParams,
    model,
    loader: CalibrationLoader,
    inventory: list[OpInfo],
    mode: str,
    workspace: Path,
) -> PassResult:
    """One pass of ``engine`` ("inc" | "native") over the loader's first confidence batches."""
    op_name_dict = dict(params.op_name_dict)
    if mode == "text_only":
        # No image in the inputs: the vision tower never runs, so its observers would see nothing.
        for pattern, cfg in VISION_FP32.items():
            op_name_dict.setdefault(pattern, cfg)
    common = dict(
        confidence_batches=params.confidence_batches,
        op_type_dict=params.op_type_dict,
        op_name_dict=op_name_dict,
        max_ops=params.max_ops,
    )
    if engine == "native":
        from .native_engine import run_native_pass

        n = params.native
        return run_native_pass(
            model,
            loader.batches,
            module_order=[op.name for op in inventory],
            op_types={op.name: op.type for op in inventory},
            requant_mode=n.requant_mode,
            device=n.device,
            dtype=n.dtype,
            reduce_range=n.reduce_range,
            allow_tf32=n.allow_tf32,
            arithmetic=n.arithmetic,
            **common,
        )
    from .inc_engine import run_forced_pass

    if params.native.requant_mode != "cumulative":
        log.info(
            "requant_mode %s applies to the native engine only; INC's requant phase is cumulative",
            params.native.requant_mode,
        )
    workspace.mkdir(parents=True, exist_ok=True)
    partial = workspace / "partial_capture.json"

    def persist(capture: Capture) -> None:
        dump_json([asdict(c) for c in capture.calls], partial)

    return run_forced_pass(
        model,
        loader,
        tolerable_loss=params.tolerable_loss,
        module_order=[op.name for op in inventory],
        workspace=workspace,
        on_call=persist,
        **common,
    )


def load_inputs(params: SensitivityParams, cal_dir: Path, model_dir: Path, inventory_path: Path):
    """Model, calibration loader (first confidence_batches x batch_size records), inventory and metadata."""
    meta, records = load_calibration(cal_dir)
    inventory = read_inventory(inventory_path)
    model, processor, card = load_model_dir(model_dir)
    needed = params.confidence_batches * params.batch_size
    if len(records) < needed:
        raise InputError(
            f"params.yaml: sensitivity.confidence_batches x batch_size = {needed} samples needed, "
            f"the calibration sample {cal_dir} has {len(records)} (raise captions.count)"
        )
    used = records[:needed]
    loader = CalibrationLoader(
        build_batches(used, cal_dir, processor, meta.mode, params.batch_size), params.batch_size
    )
    calibration = {
        "mode": meta.mode,
        "manifest_records": len(records),
        "samples_used": len(used),
        "batch_size": params.batch_size,
        "confidence_batches": params.confidence_batches,
        "annotations": meta.annotations,
        "annotations_sha256": meta.annotations_sha256,
    }
    return model, loader, inventory, {"model": asdict(card), "calibration": calibration}


def run_sensitivity(
    params: SensitivityParams,
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
    out_json: Path,
    metrics_json: Path,
    workspace: Path,
) -> dict:
    model, loader, inventory, metadata = load_inputs(params, cal_dir, model_dir, inventory_path)
    result = run_engine(
        params.engine, params, model, loader, inventory, metadata["calibration"]["mode"], workspace
    )
    report = build_report(result, inventory, metadata)
    write_report(report, out_json, metrics_json)
    log.info(
        "wrote %s (%s engine): %s",
        out_json,
        params.engine,
        json.dumps({p: len(v["ops"]) for p, v in report["phases"].items()}),
    )
    return report
