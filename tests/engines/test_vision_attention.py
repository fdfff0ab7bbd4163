"""Batched window attention: one attention call per window length, the tower's output to the bit.

Real transformers modules (a small Qwen2.5-VL vision tower, random weights), no mocks. The image
grids are not multiples of the 112-pixel window, so edge windows are shorter than the inner ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from op_sensitivity.engines.vision_attention import (
    ATTENTION_CLASS,
    batched_window_attention,
    vision_attention_modules,
    window_groups,
)

# window 112 px / patch 14 / merge 2 = 4x4 merged tokens (64 patches) per window.
# [1, 20, 28]: 10x14 merged -> window rows 4,4,2 x columns 4,4,4,2: 12 windows of 64, 32 and 16 patches.
# [1, 12, 16]: 6x8 merged -> rows 4,2 x columns 4,4: 4 windows of 64 and 32; twice, so full attention
# has two images of one length.
MIXED = [[1, 20, 28], [1, 12, 16], [1, 12, 16]]
UNIFORM = [[1, 16, 16], [1, 16, 16]]  # 8x8 merged: 4 windows of 64 each, full attention 256 each
FULL_BLOCKS = [1, 3]
# (grid, transformers' calls per forward, batched calls per forward): 2 window blocks + 2 full blocks
CALLS = {
    "mixed": (MIXED, 2 * (12 + 4 + 4) + 2 * 3, 2 * 3 + 2 * 2),  # lengths {16, 32, 64}; {560, 192}
    "uniform": (UNIFORM, 2 * 8 + 2 * 2, 2 * 1 + 2 * 1),
}


def tower(dtype: torch.dtype, attn_implementation: str) -> qwen.Qwen2_5_VisionTransformerPretrainedModel:
    config = Qwen2_5_VLVisionConfig(
        depth=4,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=48,
        fullatt_block_indexes=FULL_BLOCKS,
        window_size=112,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = qwen.Qwen2_5_VisionTransformerPretrainedModel(config)
    return model.to(dtype).eval()


def pixels(
    model: torch.nn.Module, grid: list[list[int]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grid)
    c = model.config
    generator = torch.Generator().manual_seed(1)
    width = c.in_channels * c.temporal_patch_size * c.patch_size**2
    x = torch.randn(int(grid_thw.prod(-1).sum()), width, generator=generator)
    return x.to(dtype), grid_thw


@contextlib.contextmanager
def counted_interface(name: str, default: Callable) -> Iterator[list[int]]:
    """Count the calls of the attention function ``name`` resolves to (local override, removed after)."""
    function = ALL_ATTENTION_FUNCTIONS.get_interface(name, default)
    calls = [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return function(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[name] = counting
    try:
        yield calls
    finally:
        del ALL_ATTENTION_FUNCTIONS[name]


def run(model: torch.nn.Module, x: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = model(x, grid_thw)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("case", sorted(CALLS))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_call_per_window_length_and_the_same_bits(dtype, attn_implementation, case):
    grid, loop_calls, batched_calls = CALLS[case]
    model = tower(dtype, attn_implementation)
    x, grid_thw = pixels(model, grid, dtype)
    with counted_interface(attn_implementation, qwen.eager_attention_forward) as calls:
        reference = run(model, x, grid_thw)
        assert calls[0] == loop_calls
        calls[0] = 0
        with batched_window_attention(model) as patched:
            batched = run(model, x, grid_thw)
        assert (patched, calls[0]) == (4, batched_calls)
    # Bit for bit, no tolerance: each window is still attended alone by the same kernel at the same length.
    for ref, got in zip(reference, batched, strict=True):
        assert got.dtype == dtype
        assert torch.equal(ref, got)


def test_window_groups_are_per_length_in_sequence_order():
    cu = torch.tensor([0, 64, 96, 160, 176, 208], dtype=torch.int32)
    groups = [(length, starts.tolist()) for length, starts in window_groups(cu)]
    assert groups == [(16, [160]), (32, [64, 176]), (64, [0, 96])]


def test_qkv_and_proj_are_called_through_their_modules():
    """The engines install instance forwards on the Linear ops (fake quant): they must still run."""
    model = tower(torch.float32, "sdpa")
    x, grid_thw = pixels(model, MIXED, torch.float32)
    seen: list[str] = []
    for name, linear in model.named_modules():
        if name.endswith((".attn.qkv", ".attn.proj")):
            linear.forward = lambda t, _n=name, _f=linear.forward: (seen.append(_n), _f(t))[1]
    reference = run(model, x, grid_thw)
    expected, seen[:] = list(seen), []
    with batched_window_attention(model):
        batched = run(model, x, grid_thw)
    assert seen == expected and len(expected) == 8
    assert all(torch.equal(a, b) for a, b in zip(reference, batched, strict=True))


def _plain(module: torch.nn.Module) -> bool:
    return "forward" not in vars(module) and module.forward.__func__ is type(module).forward


def test_the_class_forward_is_back_after_exit_and_after_an_exception():
    model = tower(torch.float32, "sdpa")
    modules = vision_attention_modules(model)
    assert len(modules) == 4 and all(type(m).__name__ == ATTENTION_CLASS for m in modules)
    with batched_window_attention(model) as patched:
        assert patched == 4 and not any(_plain(m) for m in modules)
        with batched_window_attention(model) as nested:  # already batched: left to the outer context
            assert nested == 0
        assert not any(_plain(m) for m in modules)
    assert all(_plain(m) for m in modules)
    with pytest.raises(RuntimeError, match="inside"), batched_window_attention(model):
        raise RuntimeError("inside")
    assert all(_plain(m) for m in modules)


def test_a_foreign_instance_forward_is_refused_not_bypassed():
    model = tower(torch.float32, "sdpa")
    first = vision_attention_modules(model)[0]
    first.forward = first.forward  # e.g. a hook installed by something else
    with pytest.raises(RuntimeError, match="instance forward"), batched_window_attention(model):
        pass
    assert "forward" in vars(first) and all(_plain(m) for m in vision_attention_modules(model)[1:])


def test_flash_attention_keeps_the_transformers_forward():
    """Flash attention is already one varlen call: the patch hands over to transformers' forward.
    A CPU stand-in for the varlen kernel (registered under the flash name) records the calls."""
    model = tower(torch.float32, "sdpa")
    x, grid_thw = pixels(model, MIXED, torch.float32)
    reference = run(model, x, grid_thw)
    seen: list[int] = []

    def varlen(module, q, k, v, attention_mask, scaling, dropout, cu_seq_lens_q, **kwargs):
        seen.append(len(cu_seq_lens_q) - 1)
        bounds = cu_seq_lens_q.tolist()
        outs = [
            F.scaled_dot_product_attention(q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], scale=scaling)
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(outs, dim=2).transpose(1, 2), None

    ALL_ATTENTION_FUNCTIONS["flash_attention_2"] = varlen
    model.config._attn_implementation = "flash_attention_2"
    try:
        with batched_window_attention(model) as patched:
            flash = run(model, x, grid_thw)
    finally:
        del ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    assert patched == 4
    assert seen == [20, 3, 20, 3]  # one call per block with every window in it
    assert all(torch.equal(a, b) for a, b in zip(reference, flash, strict=True))
