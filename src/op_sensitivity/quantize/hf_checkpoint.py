"""What every checkpoint target shares: the model's modules from its config alone, transformers'
renaming between checkpoint keys and module names, the processor files, a loaded model's logits.

Why one place: a checkpoint is read back (which modules it quantizes) without loading its weights,
and transformers saves Qwen2.5-VL under its published key layout while it names modules otherwise;
each target must map the two the same way transformers' own loader does.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from ..model.source import CARD, WEIGHT_GLOBS, load_config

# model_dir files the checkpoint does not take as they are: weights and configs (save_pretrained
# writes its own), and this project's model card (it describes the unquantized weights)
NOT_COPIED = (*WEIGHT_GLOBS, "*.index.json", "config.json", "generation_config.json", CARD)


def copy_processor(model_dir: Path, out: Path) -> None:
    """The processor and tokenizer files as the model directory has them (the checkpoint serves
    the same inputs: pixel bounds, chat template)."""
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and not any(fnmatch(f.name, p) for p in NOT_COPIED):
            shutil.copy2(f, out / f.name)


def logits_of(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``Measurer.measure_forward``'s forward for a loaded checkpoint: float inputs in its dtype."""
    dtype = next(model.parameters()).dtype

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}).logits

    return forward


def meta_model(config: Any) -> nn.Module:
    """The model the config describes, without memory (names, types and transformers' mappings only)."""
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config)


def rename_to_modules(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint key -> the model's parameter name: transformers saves Qwen2.5-VL in its published
    layout (``model.layers.*``, ``visual.*``) and renames on load (``model.language_model.*``,
    ``model.visual.*``); this applies its own conversion mapping, as its loader does."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    names = dict.fromkeys(model.state_dict())

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, converters, model.base_model_prefix, names)[0]

    return rename


def linear_modules(model_dir: Path) -> list[str]:
    """The model's Linear modules in model order, from its config alone (a meta model, no weights):
    ``load_model``'s output (a snapshot's config for ``hf_dir``) or a written checkpoint."""
    model = meta_model(load_config(model_dir))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
