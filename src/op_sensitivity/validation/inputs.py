"""A stage's measurer: the model, every calibration record, the eval split, the pass's scored ops."""

from __future__ import annotations

from pathlib import Path

from ..data.calibration import load_calibration
from ..engines.native import resolve_numerics
from ..errors import InputError
from ..inventory import module_name
from ..model.batches import build_eval_batches
from ..model.source import load_model_dir
from ..params import SensitivityParams
from ..phases import FALLBACK
from .measure import CALIBRATION, EVAL, Measurer


def scored_and_excluded(report: dict) -> tuple[list[str], set[str]]:
    """The sensitivity pass's scored ops (module order) and the ops its params kept fp32."""
    ops = sorted(report["phases"][FALLBACK]["ops"], key=lambda o: o["position"])
    return [o["module"] for o in ops], {module_name(e["op_name"]) for e in report["metadata"]["excluded_ops"]}


def open_measurer(
    sensitivity: SensitivityParams,
    batch_size: int,
    cal_dir: Path,
    eval_dir: Path,
    model_dir: Path,
    report: dict,
) -> Measurer:
    """The measurer for a stage: the model, every calibration record, the eval split, the pass's ops."""
    meta, calibration = load_calibration(cal_dir)
    _, held_out = load_calibration(eval_dir, "eval")
    model, processor, card = load_model_dir(model_dir)
    if card.sha256 != report["metadata"]["model"]["sha256"]:
        raise InputError(
            f"{model_dir}: not the model the sensitivity report scored (sha256 {card.sha256[:12]} vs "
            f"{report['metadata']['model']['sha256'][:12]}); rerun the sensitivity stage"
        )
    scored, excluded = scored_and_excluded(report)
    splits = {
        CALIBRATION: build_eval_batches(calibration, cal_dir, processor, meta.mode, batch_size),
        EVAL: build_eval_batches(held_out, eval_dir, processor, meta.mode, batch_size),
    }
    return Measurer(model, scored, resolve_numerics(sensitivity), splits, sorted(excluded))
