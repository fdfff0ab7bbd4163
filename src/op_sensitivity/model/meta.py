"""The model a run will load, built without its weights: config and module tree on ``meta``.

Why here, below both the preflight and the plan: the DAG's first stage (``check_params``) checks
the params that name modules (``fallback.always_keep``, ``op_name_dict``...) and the budgets
that count parameters against the model's own op inventory before ``load_model`` has run (a
fresh clone has no model yet), and the plan prints its costs from the same tree. PyTorch's
``meta`` device gives every tensor a shape and no storage, so even a 7B costs seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..params import ModelParams
from .full_size import full_size_config
from .processor import SPECIAL_TOKENS
from .tiny import tiny_config


class _VocabOnly:
    """What ``tiny_config`` reads of a tokenizer: its special-token ids (the first ids, in Qwen's
    order, as ``model.tokenizer`` trains them) and its size (the params' upper bound)."""

    def __init__(self, vocab_size: int):
        self.size = vocab_size

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return SPECIAL_TOKENS.index(token)


def meta_model(config: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    """The module tree of ``config`` with shaped, storage-less tensors."""
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def stored_dtype(params: ModelParams, config: Qwen2_5_VLConfig) -> str:
    """The dtype ``load_model``'s model holds its weights in: float32 for tiny, bfloat16 for
    full_size_random (cast as the checkpoints store it), a snapshot's declared dtype."""
    if params.source == "tiny":
        return "float32"
    if params.source == "full_size_random":
        return "bfloat16"  # model.full_size casts the random model as the checkpoints store it
    declared = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None)
    return str(declared).removeprefix("torch.") if declared else "bfloat16"


def model_config(params: ModelParams, model_dir: Path | None = None) -> tuple[Qwen2_5_VLConfig, bool]:
    """The config ``load_model`` builds or reads (and whether its vocabulary size is exact: a tiny
    model's tokenizer is trained on the captions, so before that its size is the params' bound)."""
    if model_dir is not None and (model_dir / "config.json").is_file():
        return Qwen2_5_VLConfig.from_pretrained(model_dir), True
    if params.source == "hf_dir":
        return Qwen2_5_VLConfig.from_pretrained(params.input), True
    if params.source == "full_size_random":
        return full_size_config(None, params.full_size), True
    return tiny_config(params.tiny, _VocabOnly(params.tiny.vocab_size)), False
