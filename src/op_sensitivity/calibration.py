"""Calibration batches for the sensitivity pass, shaped the way INC's PyTorch adaptor reads them.

INC iterates ``for example_inp, label in dataloader``: a bare dict batch with two keys would
unpack into its keys, so each item is ``(inputs, None)``. INC also reads ``batch_size``.
In mse_v2's sensitivity helpers every confidence batch both calibrates the observers and
measures the error, so batch ``i`` is used for both in trial ``i``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from .coco_captions import CalibrationRecord
from .processor import ImageTextProcessor


class CalibrationLoader:
    """A re-iterable list of model-input dicts with the attributes INC expects."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], batch_size: int):
        self.batches = batches
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], None]]:
        for batch in self.batches:
            yield batch, None

    def __len__(self) -> int:
        return len(self.batches)


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
