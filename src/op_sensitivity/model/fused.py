"""Which quantizable modules a serving runtime fuses into one layer, read from the model's dataflow.

vLLM and SGLang load Qwen2.5-VL's q/k/v projections as one ``qkv_proj`` and gate/up as one
``gate_up_proj`` (TensorRT-LLM fuses QKV too), and refuse a checkpoint in which some shards of
a fused layer are quantized and others are not. What they fuse are sibling Linear layers that
read the same input tensor, so that is how groups are found here: one forward pass, a pre-hook
on every Linear, and siblings (same parent module) that received the very same tensor form a
group. No name guessing: a model whose q/k/v are already one Linear (Qwen2.5-VL's vision
``attn.qkv``) has no group there, and one with separate but independently fed layers has none.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from .processor import ImageTextProcessor


def group_name(parent: str, members: list[str]) -> str:
    """``<parent>.{<a>,<b>,...}``: readable, and unique per parent."""
    names = "{" + ",".join(sorted(m.rsplit(".", 1)[-1] for m in members)) + "}"
    return f"{parent}.{names}" if parent else names


@torch.no_grad()
def fused_groups(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, str]:
    """Module name -> group name for every Linear that shares its input tensor with a sibling."""
    seen: dict[str, tuple[int, int, tuple, tuple]] = {}
    handles = []

    def hook(name: str):
        def record(_module, args):
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                # identity of the tensor object plus its storage view: siblings fed the same tensor
                seen[name] = (id(x), x.data_ptr(), tuple(x.shape), tuple(x.stride()))

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    by_input: dict[tuple, list[str]] = {}
    for name, key in seen.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        by_input.setdefault((parent, key), []).append(name)
    groups = {}
    for (parent, _), members in by_input.items():
        if len(members) > 1:
            for m in members:
                groups[m] = group_name(parent, members)
    return groups


def probe_batch(processor: ImageTextProcessor) -> dict[str, torch.Tensor]:
    """The smallest input that runs every tower: one grey 56x56 image (one merged patch) and a word."""
    return processor.encode(["a"], [Image.new("RGB", (56, 56), (128, 128, 128))])
