"""A small Qwen2.5-VL with a planted, function-preserving outlier, and what the pipeline measures on it."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.contract import FP32
from op_sensitivity.engines.native import run_pass
from op_sensitivity.engines.runner import load_inputs, run_engine
from op_sensitivity.inventory import read_inventory
from op_sensitivity.model.source import CARD, dir_sha256, load_model_dir, read_card
from op_sensitivity.params import CurveParams
from op_sensitivity.report.scores import phase_scores
from op_sensitivity.validation.curve import measure_curve
from op_sensitivity.validation.inputs import open_measurer, scored_and_excluded
from op_sensitivity.validation.measure import SELECTION
from tests.helpers import sensitivity_params

MLP = "model.language_model.layers.0.mlp"
PLANTED = {f"{MLP}.up_proj", f"{MLP}.down_proj"}
SCALE = 1000.0


def plant(model) -> None:
    """Scale one MLP channel up in up_proj and its down_proj column down: same function in fp32, but
    the channel's range swamps the per-tensor activation scales of up_proj's output and down_proj's
    input under int8."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        modules[f"{MLP}.up_proj"].weight[0, :] *= SCALE
        modules[f"{MLP}.down_proj"].weight[:, 0] /= SCALE


def planted_copy(model_dir: Path, inventory: Path, out: Path) -> Path:
    """A copy of a model dir with the outlier planted and its card re-hashed, the inventory beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, out)
    shutil.copy(inventory, out.parent / "op_inventory.json")
    model, _, _ = load_model_dir(out)
    plant(model)
    model.save_pretrained(out)
    card = replace(read_card(out), sha256=dir_sha256(out))
    (out / CARD).write_text(json.dumps(asdict(card)))
    return out


def screened_reports(
    small_model_dir: Path, calibration_dir: Path, work: Path, runs: dict[str, dict]
) -> tuple[dict[str, dict], list]:
    """The planted model's :func:`native_reports` (the copy under ``work``)."""
    model_dir = planted_copy(
        small_model_dir, small_model_dir.parent / "op_inventory.json", work / "m" / "qwen"
    )
    return native_reports(model_dir, calibration_dir, work, runs)


def native_reports(
    model_dir: Path, calibration_dir: Path, work: Path, runs: dict[str, dict]
) -> tuple[dict[str, dict], list]:
    """A model dir's native reports over 2 confidence batches, lm_head kept fp32, one per run:
    name -> the ``sensitivity.native`` fields it sets (screening, exact_top, ...); each pass's trial
    log under ``work / name``. Returns the reports and the inventory."""
    inventory_path = model_dir.parent / "op_inventory.json"
    inventory = read_inventory(inventory_path)
    base = sensitivity_params(op_name_dict={"lm_head": FP32}, confidence_batches=2, engine="native")
    reports = {}
    for name, native in runs.items():
        params = replace(base, native=replace(base.native, **native))
        model, spec, _, meta = load_inputs(params, calibration_dir, model_dir, inventory_path)
        reports[name] = build_report(run_pass(model, spec, workspace=work / name), inventory, meta)
    return reports, inventory


def build_planted(small_model_dir: Path, calibration_dir: Path, selection_dir: Path, work: Path) -> dict:
    """The planted model as a model dir, its native sensitivity report, and its measured curve (on the
    selection split, as the curve stage measures it)."""
    inventory = small_model_dir.parent / "op_inventory.json"
    out = planted_copy(small_model_dir, inventory, work / "planted" / "qwen2_5_vl")
    # lm_head kept fp32 (as ModelOpt's stock INT8 config does): the planted pair is the damage left
    params = replace(sensitivity_params(op_name_dict={"lm_head": FP32}), engine="native")
    inventory = read_inventory(out.parent / "op_inventory.json")
    model, spec, _, meta = load_inputs(params, calibration_dir, out, out.parent / "op_inventory.json")
    report = build_report(run_engine("native", model, spec, work / "ws"), inventory, meta)
    rankings = {p: list(df["module"]) for p, df in phase_scores(report, inventory).items()}
    _, excluded = scored_and_excluded(report)
    curve_params = CurveParams(random_lists=5)
    with open_measurer(params, 8, calibration_dir, selection_dir, out, report, SELECTION) as measurer:
        curve = measure_curve(measurer, rankings, excluded, inventory, curve_params)
    return {"dir": out, "report": report, "curve": curve, "inventory": inventory, "params": params}
