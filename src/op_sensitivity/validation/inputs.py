"""A stage's measurer: the model (or a carved copy), every calibration record, one held-out split
(``selection`` for the curve stage, ``test`` for validate), the pass's scored ops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..data.calibration import load_calibration
from ..engines.numerics import resolve_numerics
from ..errors import InputError
from ..inventory import module_name, op_inventory
from ..model.batches import build_eval_batches
from ..model.carve import Carve, batch_tokens, load_carved
from ..model.processor import ImageTextProcessor
from ..model.source import load_model_dir, read_card
from ..params import SensitivityParams
from ..phases import FALLBACK
from .measure import CALIBRATION, HELD_OUT, SELECTION, Measurer


def scored_and_excluded(report: dict) -> tuple[list[str], set[str]]:
    """The sensitivity pass's scored ops (module order) and the ops its params kept fp32."""
    ops = sorted(report["phases"][FALLBACK]["ops"], key=lambda o: o["position"])
    return [o["module"] for o in ops], {module_name(e["op_name"]) for e in report["metadata"]["excluded_ops"]}


def _check_same_model(model_dir: Path, sha256: str, report: dict) -> None:
    if sha256 != report["metadata"]["model"]["sha256"]:
        raise InputError(
            f"{model_dir}: not the model the sensitivity report scored (sha256 {sha256[:12]} vs "
            f"{report['metadata']['model']['sha256'][:12]}); rerun the sensitivity stage"
        )


def _read_splits(
    cal_dir: Path, held_out_dir: Path, split: str
) -> tuple[Callable[[ImageTextProcessor, int], dict[str, list]], dict[str, list[int]]]:
    """Read both splits now (a bad one is named before the model loads); encode them later.

    ``split``: which held-out split ``held_out_dir`` must hold (``selection`` or ``test``). Also
    each split's image ids, sample by sample (the measurer's :meth:`~Measurer.images`)."""
    if split not in HELD_OUT:
        raise ValueError(f"expected a held-out split of {HELD_OUT}, got {split!r}")
    meta, calibration = load_calibration(cal_dir)
    _, held_out = load_calibration(held_out_dir, split)

    def encode(processor: ImageTextProcessor, batch_size: int) -> dict[str, list]:
        return {
            CALIBRATION: build_eval_batches(calibration, cal_dir, processor, meta.mode, batch_size),
            split: build_eval_batches(held_out, held_out_dir, processor, meta.mode, batch_size),
        }

    images = {CALIBRATION: [r.image_id for r in calibration], split: [r.image_id for r in held_out]}
    return encode, images


def open_measurer(
    sensitivity: SensitivityParams,
    batch_size: int,
    cal_dir: Path,
    held_out_dir: Path,
    model_dir: Path,
    report: dict,
    split: str = SELECTION,
) -> Measurer:
    """The measurer for a stage: the model, every calibration record, the held-out ``split`` (read
    from ``held_out_dir``), the pass's ops."""
    encode, images = _read_splits(cal_dir, held_out_dir, split)
    model, processor, card = load_model_dir(model_dir)
    _check_same_model(model_dir, card.sha256, report)
    scored, excluded = scored_and_excluded(report)
    splits = encode(processor, batch_size)
    return Measurer(model, scored, resolve_numerics(sensitivity), splits, sorted(excluded), images)


def open_carved_measurer(
    sensitivity: SensitivityParams,
    batch_size: int,
    cal_dir: Path,
    held_out_dir: Path,
    model_dir: Path,
    report: dict,
    layers: int,
    vision_blocks: int,
    split: str = SELECTION,
) -> tuple[Measurer, Carve]:
    """The same measurer on a carved copy of the model (``model.carve``): the pass's scored ops
    that the copy has are scored, every other op of the copy stays in high precision (the ops
    the pass's params kept fp32, as in the full model)."""
    encode, images = _read_splits(cal_dir, held_out_dir, split)
    _check_same_model(model_dir, read_card(model_dir).sha256, report)
    splits = encode(ImageTextProcessor.load(model_dir), batch_size)
    tokens = batch_tokens(b for batches in splits.values() for b, _ in batches)
    model, carve = load_carved(model_dir, layers, vision_blocks, tokens)
    splits = {name: [(carve.remap(b), m) for b, m in batches] for name, batches in splits.items()}
    present = {name for name, _ in model.named_modules()}
    scored, _ = scored_and_excluded(report)
    scored = [m for m in scored if m in present]
    kept = [op.name for op in op_inventory(model) if op.name not in scored]
    return Measurer(model, scored, resolve_numerics(sensitivity), splits, kept, images), carve
