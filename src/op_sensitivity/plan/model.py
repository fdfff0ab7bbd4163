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
from transformers import Qwen2_5_VLConfig

from ..inventory import OpInfo, op_inventory
from ..model.carve import carved_config
from ..model.meta import meta_model, model_config
from ..model.meta import stored_dtype as _stored_dtype
from ..params import ModelParams

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight once, as the model card counts


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
