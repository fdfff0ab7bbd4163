"""Calibration records -> model inputs, in manifest order.

In mse_v2's sensitivity helpers every confidence batch both calibrates the observers and
measures the error, so batch ``i`` is used for both in trial ``i``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..data.calibration import CalibrationRecord
from .processor import ImageTextProcessor


def build_batches(
    records: list[CalibrationRecord],
    cal_dir: Path,
    processor: ImageTextProcessor,
    mode: str,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, torch.Tensor]]:
    """Encode records in manifest order; ``text_only`` feeds the caption alone (no vision tower)."""
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        captions = [r.caption for r in chunk]
        images = None
        if mode == "image_caption":
            images = []
            for r in chunk:
                with Image.open(cal_dir / r.image) as im:
                    images.append(im.convert("RGB"))
        batch = processor.encode(captions, images)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
        batches.append(batch)
    return batches
