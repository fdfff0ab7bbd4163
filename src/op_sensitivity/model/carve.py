"""A carved copy of a model: its first decoder layers and vision blocks, and the vocabulary rows the
batches use; real weights, real widths.

Why: INC's per-op loop deep-copies and re-traces the whole model for every op; at 3B width that
is ~45 s per op on 2 cores and 50-75 GB of memory, so INC against the native engine on the whole
3B cannot finish on the machines users have. Engine equivalence is a property of the arithmetic
(the same observers, rounding and kernels per op type at the same widths), so the check runs on
a copy carved from the same weights:

* depth: the first ``layers`` decoder layers and ``vision_blocks`` vision blocks, every tensor of
  them the checkpoint's, with the patch embedding, merger, final norm and ``lm_head``; module
  names are the original ones (``model.language_model.layers.0...``), so an op of the copy is
  the op of the same name in the full model. The copy is loaded with the full model's loader
  and a config whose depths are cut, so the layers past the cut are never read from disk.
* vocabulary: only the rows of ``embed_tokens`` and ``lm_head`` for the token ids the batches
  hold (and the config's special tokens), in id order; the batches' ids are renumbered to
  match (:meth:`Carve.remap`). Both ops are quantized row by row (the Embedding per row, the
  Linear per output channel), so every kept row is quantized exactly as in the full model; what
  changes is that ``lm_head``'s output observer sees the kept logits only. Without this the two
  151,936-row tables are most of a carved 3B (311 M of 543 M parameters), and INC copies them
  for every op: measured on the 3B, 2 layers and 2 blocks, 12.7 min and 10.7 GiB with them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..errors import InputError
from .source import read_card, weights_dir

log = logging.getLogger(__name__)

# config fields naming token ids the model itself reads (rope index, image placeholders, padding)
TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
TEXT_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class Carve:
    """What a carved copy holds, in the words an artifact needs to say what was compared."""

    decoder_layers: int  # the first ones, 0 .. decoder_layers - 1
    of_decoder_layers: int
    vision_blocks: int
    of_vision_blocks: int
    vocab: int  # embedding / lm_head rows kept
    of_vocab: int
    params: int  # the carved copy's
    source_params: int  # the full model's (the card's)
    source_sha256: str  # the weights it was carved from (the card's content hash)
    token_ids: tuple[int, ...] = field(default=(), repr=False)  # the kept rows' ids, in new-id order

    def describe(self) -> str:
        return (
            f"the first {self.decoder_layers} of {self.of_decoder_layers} decoder layers, "
            f"{self.vision_blocks} of {self.of_vision_blocks} vision blocks and {self.vocab:,} of "
            f"{self.of_vocab:,} vocabulary rows ({self.params:,} of {self.source_params:,} parameters, "
            "real weights)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "decoder_layers": self.decoder_layers,
            "of_decoder_layers": self.of_decoder_layers,
            "vision_blocks": self.vision_blocks,
            "of_vision_blocks": self.of_vision_blocks,
            "vocab": self.vocab,
            "of_vocab": self.of_vocab,
            "params": self.params,
            "source_params": self.source_params,
            "model_sha256": self.source_sha256,
        }

    def remap(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch with its token ids renumbered to the copy's rows."""
        lookup = torch.full((self.of_vocab,), -1, dtype=torch.long)
        lookup[list(self.token_ids)] = torch.arange(len(self.token_ids))
        ids = lookup[batch["input_ids"]]
        if (ids < 0).any():
            raise ValueError("carve: the batch holds token ids the carved vocabulary does not")
        return {**batch, "input_ids": ids.to(batch["input_ids"].dtype)}


def _token_ids(config: Qwen2_5_VLConfig) -> set[int]:
    ids: set[int] = set()
    for cfg, names in ((config, TOKEN_FIELDS), (config.text_config, TEXT_TOKEN_FIELDS)):
        for name in names:
            value = getattr(cfg, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            ids |= {v for v in values if isinstance(v, int)}
    return ids


def carved_config(config: Qwen2_5_VLConfig, layers: int, vision_blocks: int) -> Qwen2_5_VLConfig:
    """``config`` cut to the first ``layers`` decoder layers and ``vision_blocks`` vision blocks."""
    out = copy.deepcopy(config)
    text, vision = out.text_config, out.vision_config
    layers = min(layers, text.num_hidden_layers)
    vision_blocks = min(vision_blocks, vision.depth)
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types)[:layers]
    vision.depth = vision_blocks
    vision.fullatt_block_indexes = [i for i in vision.fullatt_block_indexes if i < vision_blocks]
    return out


@contextlib.contextmanager
def carved_full_size(layers: int, vision_blocks: int) -> Iterator[None]:
    """Inside, a ``full_size_random`` model is built at the published widths with only ``layers``
    decoder layers and ``vision_blocks`` vision blocks. Why: benchmarks that export or serve a
    3B-width model (benchmarks/quantize_full_size.py, vllm_3b.py) cannot hold all 36 layers on
    the machines they run on; the pipeline never calls this. Not thread-safe: it swaps
    ``full_size.full_size_config`` for the duration."""
    from . import full_size

    published = full_size.full_size_config
    full_size.full_size_config = lambda *a, **k: carved_config(published(*a, **k), layers, vision_blocks)
    try:
        yield
    finally:
        full_size.full_size_config = published


def _renumber(config: Qwen2_5_VLConfig, new_id: dict[int, int]) -> None:
    for cfg, names in ((config, TOKEN_FIELDS), (config.text_config, TEXT_TOKEN_FIELDS)):
        for name in names:
            value = getattr(cfg, name, None)
            if isinstance(value, int):
                setattr(cfg, name, new_id[value])
            elif isinstance(value, (list, tuple)):
                setattr(cfg, name, [new_id[v] if isinstance(v, int) else v for v in value])


def _cut_vocab(model: Qwen2_5_VLForConditionalGeneration, rows: list[int]) -> None:
    """Keep only ``rows`` of the embedding and lm_head (real values; a tie stays a tie)."""
    index = torch.tensor(rows)
    old = model.get_input_embeddings()
    tied = model.lm_head.weight is old.weight
    new_id = {r: i for i, r in enumerate(rows)}
    pad = new_id.get(old.padding_idx) if old.padding_idx is not None else None
    embed = nn.Embedding(len(rows), old.embedding_dim, padding_idx=pad, dtype=old.weight.dtype)
    embed.weight = nn.Parameter(old.weight.detach()[index].clone(), requires_grad=False)
    model.set_input_embeddings(embed)
    head = nn.Linear(model.lm_head.in_features, len(rows), bias=False, dtype=model.lm_head.weight.dtype)
    head.weight = (
        embed.weight
        if tied
        else nn.Parameter(model.lm_head.weight.detach()[index].clone(), requires_grad=False)
    )
    model.lm_head = head
    _renumber(model.config, new_id)
    model.config.text_config.vocab_size = len(rows)


def load_carved(
    model_dir: Path, layers: int, vision_blocks: int, tokens: Iterable[int] | None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Carve]:
    """The model of ``model_dir`` (``load_model``'s output) carved as the module doc says; ``tokens``:
    every token id the batches it will see hold (None keeps the whole vocabulary: for the
    benchmark that measures what the cut saves)."""
    if layers < 1 or vision_blocks < 1:
        raise InputError(
            "carve: expected at least one decoder layer and one vision block, got "
            f"{layers} and {vision_blocks}"
        )
    card = read_card(model_dir)
    source = weights_dir(model_dir, card)
    full = Qwen2_5_VLConfig.from_pretrained(source, local_files_only=True)
    config = carved_config(full, layers, vision_blocks)
    # the load report lists every tensor past the cut as unexpected: hundreds of lines, all expected
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, config=config, dtype="auto", local_files_only=True
        ).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    of_vocab = model.get_input_embeddings().num_embeddings
    if tokens is None:
        rows = list(range(of_vocab))
    else:
        rows = sorted(set(tokens) | _token_ids(model.config))
        if rows and rows[-1] >= of_vocab:
            raise InputError(f"carve: token id {rows[-1]} is outside the model's vocabulary of {of_vocab}")
        _cut_vocab(model, rows)
    carve = Carve(
        decoder_layers=config.text_config.num_hidden_layers,
        of_decoder_layers=full.text_config.num_hidden_layers,
        vision_blocks=config.vision_config.depth,
        of_vision_blocks=full.vision_config.depth,
        vocab=len(rows),
        of_vocab=of_vocab,
        params=sum(p.numel() for p in model.parameters()),
        source_params=card.params,
        source_sha256=card.sha256,
        token_ids=tuple(rows),
    )
    log.info("carved copy of %s: %s", model_dir, carve.describe())
    return model, carve


def batch_tokens(batches: Iterable[dict[str, torch.Tensor]]) -> set[int]:
    """Every token id the batches hold: the vocabulary rows a carved copy must keep."""
    return {int(t) for b in batches for t in torch.unique(b["input_ids"])}
