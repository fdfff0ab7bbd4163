"""Stage sensitivity: calibration sample + model directory -> ``op_sensitivity.json`` + metrics.

Glue only: builds the INC calibration loader, runs the forced pass (``inc_engine``), persists
each helper call's values as it lands (a long run that dies keeps what it measured in
``<workspace>/partial_capture.json``), and writes the validated report atomically.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from .atomic import dump_json
from .calibration import CalibrationLoader, build_batches
from .coco_captions import load_calibration
from .inc_engine import Capture, run_forced_pass
from .inventory import read_inventory
from .model_source import load_model_dir
from .params import SensitivityParams
from .sensitivity_report import build_report, write_report

log = logging.getLogger(__name__)


def run_sensitivity(
    params: SensitivityParams,
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
    out_json: Path,
    metrics_json: Path,
    workspace: Path,
) -> dict:
    meta, records = load_calibration(cal_dir)
    inventory = read_inventory(inventory_path)
    model, processor, card = load_model_dir(model_dir)
    used = records[: params.confidence_batches * params.batch_size]
    if len(used) < params.confidence_batches * params.batch_size:
        from .errors import InputError

        raise InputError(
            f"params.yaml: sensitivity.confidence_batches x batch_size = "
            f"{params.confidence_batches * params.batch_size} samples needed, the calibration sample "
            f"{cal_dir} has {len(records)} (raise captions.count)"
        )
    loader = CalibrationLoader(
        build_batches(used, cal_dir, processor, meta.mode, params.batch_size), params.batch_size
    )
    workspace.mkdir(parents=True, exist_ok=True)
    partial = workspace / "partial_capture.json"

    def persist(capture: Capture) -> None:
        dump_json([asdict(c) for c in capture.calls], partial)

    op_name_dict = dict(params.op_name_dict)
    if meta.mode == "text_only":
        # No image in the inputs: the vision tower never runs, so its observers would see nothing.
        op_name_dict.setdefault(
            "model\\.visual\\..*", {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}
        )
    result = run_forced_pass(
        model,
        loader,
        confidence_batches=params.confidence_batches,
        tolerable_loss=params.tolerable_loss,
        op_type_dict=params.op_type_dict,
        op_name_dict=op_name_dict,
        max_ops=params.max_ops,
        module_order=[op.name for op in inventory],
        workspace=workspace,
        on_call=persist,
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
    report = build_report(result, inventory, {"model": asdict(card), "calibration": calibration})
    write_report(report, out_json, metrics_json)
    log.info("wrote %s: %s", out_json, json.dumps({p: len(v["ops"]) for p, v in report["phases"].items()}))
    return report
