"""Qwen2.5-VL's window attention as one attention call per window length, not one per window.

Why: with a non-flash attention implementation (sdpa, eager: what this project runs)
transformers' ``Qwen2_5_VLVisionAttention.forward`` splits the sequence at ``cu_seqlens`` and
calls the attention function once per window. The full-size 3B with four 448x448 images makes
1,808 such calls per forward (64 windows x 28 window blocks + 4 images x 4 full blocks), each
a few microseconds of work: on a GPU the loop is bound by kernel launches, not arithmetic.
Windows are independent, and most have the same length (64 tokens unless an image edge cuts
them), so :func:`batched_window_attention` stacks the windows of each length along the batch
dimension, shape ``(n_windows, heads, length, head_dim)``, makes one call of the same attention
interface with the same arguments, and scatters the rows back into sequence order.

Values: each window is still attended on its own by the same kernel with the same sequence
length, so every output row is computed the same way; the tests check the tower's output
bit for bit (``torch.equal``) against transformers' loop. The ``qkv`` and ``proj`` Linear
modules are called exactly as transformers calls them (``self.qkv(hidden_states)``,
``self.proj(...)``), so forwards the engines install on them (fake quantization) still run.
Flash attention (``is_flash_attention_requested``) is left alone: transformers already makes
one variable-length call there.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.utils.generic import is_flash_attention_requested

ATTENTION_CLASS = "Qwen2_5_VLVisionAttention"


def window_groups(cu_seqlens: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Per distinct window length (ascending): ``(length, starts)``, the windows' first tokens in order.

    Zero-length windows (none after transformers' ``unique_consecutive``) are dropped."""
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    return [(length, torch.tensor(starts)) for length, starts in sorted(by_length.items())]


def _token_index(starts: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """Sequence positions of the windows' tokens, window after window: ``(n_windows * length,)``."""
    return (starts[:, None] + torch.arange(length)).reshape(-1).to(device)


def _stack(x: torch.Tensor, index: torch.Tensor | None, n: int, length: int) -> torch.Tensor:
    """``(seq, heads, head_dim)`` -> ``(n, heads, length, head_dim)``; ``index=None``: all tokens, a view."""
    rows = x if index is None else x.index_select(0, index)
    return rows.unflatten(0, (n, length)).transpose(1, 2)


def grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    attention_interface: Callable,
    **kwargs: Any,
) -> torch.Tensor:
    """Attention within each window of ``cu_seqlens``, one ``attention_interface`` call per length.

    ``query``/``key``/``value``: ``(seq, heads, head_dim)``; returns ``(seq, heads, head_dim)``."""
    seq_length = query.shape[0]
    groups = window_groups(cu_seqlens)
    out: torch.Tensor | None = None
    for length, starts in groups:
        n = len(starts)
        whole = n * length == seq_length  # one length for every window: the windows are the sequence
        index = None if whole else _token_index(starts, length, query.device)
        attn, _ = attention_interface(
            module,
            *(_stack(t, index, n, length) for t in (query, key, value)),
            attention_mask=None,
            scaling=module.scaling,
            dropout=0.0 if not module.training else module.attention_dropout,
            is_causal=False,
            **kwargs,
        )
        attn = attn.reshape(n * length, *attn.shape[2:])  # interface output: (n, length, heads, head_dim)
        if index is None:
            return attn
        if out is None:
            out = attn.new_empty(seq_length, *attn.shape[1:])
        out.index_copy_(0, index, attn)
    if out is None:
        raise ValueError(f"no tokens in the windows of cu_seqlens {cu_seqlens.tolist()}")
    return out


def batched_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``Qwen2_5_VLVisionAttention.forward`` (transformers 5.2x), the window loop grouped by length."""
    if is_flash_attention_requested(self.config):
        return type(self).forward(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    seq_length = hidden_states.shape[0]
    query, key, value = (
        self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    )
    cos, sin = position_embeddings
    query, key = qwen.apply_rotary_pos_emb_vision(query, key, cos, sin)
    attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, qwen.eager_attention_forward
    )
    attn_output = grouped_attention(self, query, key, value, cu_seqlens, attention_interface, **kwargs)
    return self.proj(attn_output.reshape(seq_length, -1).contiguous())


def vision_attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == ATTENTION_CLASS]


def _is_batched(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is batched_forward


@contextlib.contextmanager
def batched_window_attention(model: nn.Module) -> Iterator[int]:
    """Install :func:`batched_forward` on every Qwen2.5-VL vision attention of ``model`` as an
    instance attribute; yields how many were patched (0 for a model without one). On exit, also
    on an exception, the attributes are deleted and the class's forward is back.

    A module already batched by an enclosing context is left to that context. Any other
    instance-level ``forward`` is refused rather than silently bypassed."""
    modules = [m for m in vision_attention_modules(model) if not _is_batched(m)]
    foreign = [m for m in modules if "forward" in m.__dict__]
    if foreign:
        raise RuntimeError(f"{len(foreign)} vision attention module(s) already have an instance forward")
    patched: list[nn.Module] = []
    try:
        for module in modules:
            module.forward = types.MethodType(batched_forward, module)
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
