"""A scoped change to transformers' Qwen2.5-VL for INC's quantized model.

``Qwen2_5_VisionPatchEmbed.forward`` casts the pixels to ``self.proj.weight.dtype`` before its
Conv3d; INC's quantized Conv3d has no ``weight.dtype`` (its ``weight`` is a method). The batches
already come in the compute dtype (float32 for INC), so the cast is a no-op and can go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def pixels_keep_their_dtype() -> Iterator[None]:
    """Qwen2.5-VL's patch embedding without the pixel cast, for the duration of the block."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    original = Qwen2_5_VisionPatchEmbed.forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.view(
            -1, self.in_channels, self.temporal_patch_size, self.patch_size, self.patch_size
        )
        return self.proj(hidden_states).view(-1, self.embed_dim)

    Qwen2_5_VisionPatchEmbed.forward = forward
    try:
        yield
    finally:
        Qwen2_5_VisionPatchEmbed.forward = original
