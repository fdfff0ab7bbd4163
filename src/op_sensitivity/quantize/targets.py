"""Every deployment target by its name in ``quantize.targets`` (one module per backend)."""

from __future__ import annotations

from .base import Target
from .compressed_tensors import CompressedTensors
from .inc_ptq import Inc
from .modelopt import ModeloptFp8, ModeloptInt8
from .onnx_runtime import OrtQdq

TARGETS: dict[str, type[Target]] = {
    t.name: t for t in (CompressedTensors, OrtQdq, ModeloptInt8, ModeloptFp8, Inc)
}


def target(name: str) -> Target:
    return TARGETS[name]()
