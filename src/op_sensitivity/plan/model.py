"""The model a run will load, described without its weights: config, ops, parameters, stored bytes.

Why without weights: the plan is printed before ``load_model`` runs (a fresh clone has no model
yet) and must cost seconds even for a 7B, so the architecture is built on PyTorch's ``meta``
device, where a tensor has a shape and no storage. Where ``load_model``'s output is already
there and up to date, its config is read instead (the real vocabulary of a trained tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..inventory import OpInfo, op_inventory
from ..model.carve import carved_config
from ..model.full_size import full_size_config
from ..model.processor import SPECIAL_TOKENS
from ..model.tiny import tiny_config
from ..params import ModelParams

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class _VocabOnly:
    """What ``tiny_config`` reads of a tokenizer: its special-token ids (the first ids, in Qwen's
    order, as ``model.tokenizer`` trains them) and its size (the params' upper bound)."""

    def __init__(self, vocab_size: int):
        self.size = vocab_size

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return SPECIAL_TOKENS.index(token)


@dataclass(frozen=True)
class ModelFacts:
    source: str
    config: Qwen2_5_VLConfig
    ops: list[OpInfo]
    params: int
    stored_bytes_per_param: int  # 2 for a bf16 checkpoint, 4 for float32
    exact: bool  # False: a tiny vocabulary's size is the params' upper bound

    @property
    def stored_bytes(self) -> int:
        return self.params * self.stored_bytes_per_param

    def label(self) -> str:
        bound = "" if self.exact else " at most"
        return f"{self.source}, {self.params:,} parameters{bound}, {len(self.ops)} ops"


def meta_model(config: Qwen2_5_VLConfig) -> Qwen2_5_VLForConditionalGeneration:
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once, as the model card counts


def model_config(params: ModelParams, model_dir: Path | None = None) -> tuple[Qwen2_5_VLConfig, bool]:
    """The config ``load_model`` builds or reads (and whether its vocabulary size is exact)."""
    if model_dir is not None and (model_dir / "config.json").is_file():
        return Qwen2_5_VLConfig.from_pretrained(model_dir), True
    if params.source == "hf_dir":
        return Qwen2_5_VLConfig.from_pretrained(params.input), True
    if params.source == "full_size_random":
        return full_size_config(None, params.full_size), True
    return tiny_config(params.tiny, _VocabOnly(params.tiny.vocab_size)), False


def _stored_dtype(params: ModelParams, config: Qwen2_5_VLConfig) -> str:
    if params.source == "tiny":
        return "float32"
    if params.source == "full_size_random":
        return "bfloat16"  # model.full_size casts the random model as the checkpoints store it
    declared = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None)
    return str(declared).removeprefix("torch.") if declared else "bfloat16"


def describe(params: ModelParams, model_dir: Path | None = None) -> ModelFacts:
    """The model of ``params`` (``model_dir``: ``load_model``'s output, when it is up to date)."""
    config, exact = model_config(params, model_dir)
    model = meta_model(config)
    card = model_dir / "op_sensitivity_model.json" if model_dir is not None else None
    count = json.loads(card.read_text())["params"] if card is not None and card.is_file() else _params(model)
    dtype = _stored_dtype(params, config)
    return ModelFacts(params.source, config, op_inventory(model), count, DTYPE_BYTES.get(dtype, 2), exact)


def carved_facts(facts: ModelFacts, layers: int, vision_blocks: int, vocab_rows: int) -> tuple[int, int]:
    """(parameters, ops) of the carved copy ``model.carve`` makes, ``vocab_rows`` at most."""
    config = carved_config(facts.config, layers, vision_blocks)
    model = meta_model(config)
    embed = model.get_input_embeddings()
    rows = min(vocab_rows, embed.num_embeddings)
    tied = model.lm_head.weight is embed.weight
    cut = (embed.num_embeddings - rows) * embed.embedding_dim * (1 if tied else 2)
    return _params(model) - cut, len(op_inventory(model))
