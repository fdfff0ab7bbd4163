"""Calibration records -> model inputs, in manifest order.

In mse_v2's sensitivity helpers every confidence batch both calibrates the observers and
measures the error, so batch ``i`` is used for both in trial ``i``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from ..data.calibration import CalibrationRecord
from .processor import ImageTextProcessor


def _chunks(
    records: list[CalibrationRecord], cal_dir: Path, mode: str, batch_size: int
) -> Iterator[tuple[list[str], list[Image.Image] | None]]:
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = None
        if mode == "image_caption":
            images = []
            for r in chunk:
                with Image.open(cal_dir / r.image) as im:
                    images.append(im.convert("RGB"))
        yield [r.caption for r in chunk], images


def _cast(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def build_batches(
    records: list[CalibrationRecord],
    cal_dir: Path,
    processor: ImageTextProcessor,
    mode: str,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, torch.Tensor]]:
    """Encode records in manifest order; ``text_only`` feeds the caption alone (no vision tower)."""
    return [
        _cast(processor.encode(captions, images), dtype)
        for captions, images in _chunks(records, cal_dir, mode, batch_size)
    ]


def build_eval_batches(
    records: list[CalibrationRecord],
    cal_dir: Path,
    processor: ImageTextProcessor,
    mode: str,
    batch_size: int,
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Like :func:`build_batches`, each batch with the mask of its caption tokens (teacher forcing)."""
    out = []
    for captions, images in _chunks(records, cal_dir, mode, batch_size):
        batch, mask = processor.encode_with_targets(captions, images)
        out.append((_cast(batch, torch.float32), mask))
    return out
