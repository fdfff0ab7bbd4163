"""Compute-dtype copies of stored weights, written into one reused buffer per shape.

Why: the native engine keeps each weight as stored (bf16 for the published checkpoints, int8
codes for a scheme's quantized weight) and makes the compute-dtype copy for the one call that
needs it (:class:`.fakequant.FakeQuantModel`). glibc serves a tensor above its mmap threshold (32
MiB at most; a 3B MLP weight in float32 is 90 MB, ``lm_head`` 1.2 GB) with fresh pages and
returns them when it is freed, so every call faulted in and zeroed the copy's pages again: at 3B
width on the 2-core machine about 40 % of a float32 decoder layer's time (the plan's probe:
165-172 ms with fresh copies, 103 ms so; ``benchmarks/weight_copies.py``, docs/benchmarks.md).
Here each copy is written in place into a buffer kept for its (role, shape, dtype).

Why not the allocator: glibc serving large tensors from its heap (``mallopt(M_MMAP_MAX, 0)``) was
as fast, but in a gradient sweep the tensors autograd keeps are cut from the holes the freed
copies leave, the next copy no longer fits, and the heap grows: the 3B first-order stage peaked
at 19.9 GiB instead of 11.6 GiB (docs/benchmarks.md).

When a buffer is not used, and a fresh copy is made as before: while autograd records (it would
keep the buffer for the backward, and the next call would overwrite it under it), where anything
but this pool still holds the buffer (its Python reference count), off the CPU (CUDA's caching
allocator reuses blocks already), and where the stored dtype is the compute dtype (no copy at
all). Memory: one buffer per distinct shape, held while the model is: about 1.5 GB at 3B,
``lm_head``'s 1.2 GB the largest (a fresh copy held it during its call only). Measured: the
carved 3B's peak +1.5 GiB, the whole 3B stages' peaks -0.2 to +0.4 GiB.
Values: ``copy_`` and the in-place dequantization compute the same elements as the out-of-place
operations they replace (tests/engines/test_weight_copies.py).
"""

from __future__ import annotations

import sys

import torch

from ..schemes.qdq import QParams, dequantize

# references to a pooled buffer while nothing else holds it: the pool's dict, the local name in
# _buffer, getrefcount's own argument
FREE_REFS = 3


class WeightCopies:
    """The buffers of one model's per-call weight copies (its :class:`FakeQuantModel`)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.reused = 0  # calls served by a buffer (the tests read them)
        self.fresh = 0  # calls that made a fresh copy where a buffer could have served

    def _buffer(self, role: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The buffer for a copy of ``like`` in ``dtype``, or None where one must not be used."""
        if like.device.type != "cpu" or torch.is_grad_enabled():
            return None
        key = (role, tuple(like.shape), dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(like.shape, dtype=dtype)
        elif sys.getrefcount(buf) > FREE_REFS:  # still held by the caller of the last copy
            self.fresh += 1
            return None
        self.reused += 1
        return buf

    def upcast(self, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``stored.to(dtype)`` (the stored tensor itself where the dtypes agree)."""
        if stored.dtype == dtype:
            return stored
        buf = self._buffer("upcast", stored, dtype)
        return stored.to(dtype) if buf is None else buf.copy_(stored)

    def dequantized(self, codes: torch.Tensor, qp: QParams, dtype: torch.dtype) -> torch.Tensor:
        """``dequantize(codes, qp, dtype)``; a float32 result is written into a buffer."""
        buf = self._buffer("dequantized", codes, torch.float32) if dtype == torch.float32 else None
        return dequantize(codes, qp, dtype, out=buf)
