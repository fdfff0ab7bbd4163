"""One ONNX graph of Qwen2.5-VL that serves any input: dynamic axes, and the integer tensors that
transformers computes in Python from the image grid and the token layout fed in as inputs.

Why: tracing freezes whatever Python computes from tensor values. Exported the plain way
(``model(**batch)``), the graph holds one batch's image grid (``image_grid_thw.tolist()``: the
vision positions, the window index, the per-window attention loop) and its 3-D rope positions
(``get_rope_index`` walks the token layout in Python), so it serves that layout only. transformers
5.24 already separates those computations from the weights: ``transformers.vision_utils`` computes
the vision tower's ``position_ids``, ``cu_seqlens``, ``window_index`` and ``cu_window_seqlens`` from
``grid_thw`` and config scalars, and the tower takes them precomputed as keyword arguments;
``Qwen2_5_VLModel.get_rope_index`` computes the decoder's 3-D positions from the token ids and the
grid. The same split as ONNX Runtime GenAI's multimodal models (the runtime computes positions, the
graphs hold the weights), in one graph:

* inputs: ``input_ids``, ``attention_mask`` [batch, sequence]; ``position_ids`` [3, batch,
  sequence]; ``pixel_values`` [patches, channels x temporal x patch x patch];
  ``vision_position_ids`` [patches, 2]; ``cu_seqlens`` [images + 1]; ``window_index``
  [patches / 4]; ``cu_window_seqlens`` [windows + 1]. Every axis dynamic.
* inside: the vision tower (its own forward with the precomputed tensors), the image features
  placed at the image tokens (``masked_scatter``, as the model does), the decoder and ``lm_head``.
* the vision attention runs as one attention call over the whole sequence with a block-diagonal
  mask built in the graph from ``cu_seqlens`` (transformers' sdpa / eager path splits the sequence
  at ``cu_seqlens.tolist()`` in Python, which tracing would freeze). Masked keys get zero weight
  exactly, so each row attends to its window's keys as before; only float summation order differs
  (2.4e-7 on the embedded default's logits, measured by the tests).

The root and ``model`` forwards are swapped for the call (so node names keep the module paths from
the root, ``/model/visual/blocks.0/attn/qkv/Gemm``, ``/lm_head/MatMul``: the names a user's
``nodes_to_exclude`` reads); nothing else of the model changes.

:func:`graph_inputs` is the glue a user runs per batch: it needs the model's config, no weights
(the artifact stores it as ``config.json``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, vision_utils
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from ..errors import InputError
from .base import Batch
from .onnx_export import OPSET, inline_constant_identities, save_onnx

TEXT_INPUTS = ["input_ids", "attention_mask", "position_ids"]
VISION_INPUTS = ["pixel_values", "vision_position_ids", "cu_seqlens", "window_index", "cu_window_seqlens"]
AXES = {
    "input_ids": {0: "batch", 1: "sequence"},
    "attention_mask": {0: "batch", 1: "sequence"},
    "position_ids": {1: "batch", 2: "sequence"},
    "pixel_values": {0: "patches"},
    "vision_position_ids": {0: "patches"},
    "cu_seqlens": {0: "images_plus_1"},
    "window_index": {0: "merged_patches"},
    "cu_window_seqlens": {0: "windows_plus_1"},
    "logits": {0: "batch", 1: "sequence"},
}


def input_names(batch: Batch) -> list[str]:
    """The graph's inputs for batches like ``batch``: with the vision inputs when it has an image."""
    return TEXT_INPUTS + (VISION_INPUTS if "pixel_values" in batch else [])


def _rope_index(config: Qwen2_5_VLConfig, batch: Batch) -> torch.Tensor:
    """transformers' own ``get_rope_index`` on a weightless stand-in for the model (it reads the
    config and calls ``get_vision_position_ids``, which reads nothing of ``self``)."""
    stub = types.SimpleNamespace(config=config)
    stub.get_vision_position_ids = types.MethodType(qwen.Qwen2_5_VLModel.get_vision_position_ids, stub)
    positions, _ = qwen.Qwen2_5_VLModel.get_rope_index(
        stub,
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    return positions


def graph_inputs(
    config: Qwen2_5_VLConfig, batch: Batch, names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """The serving graph's feed for one processor batch (``input_ids``, ``attention_mask``, and for
    an image batch ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``), computed as the
    model computes it: a text-only batch numbers its tokens in sequence, as the model does without
    an image grid. ``names``: only the graph's own inputs (the exporter drops one no node reads, e.g.
    ``cu_window_seqlens`` of a tower without a windowed block)."""
    b = {k: v.detach().cpu() for k, v in batch.items()}
    ids = b["input_ids"]
    if "pixel_values" not in b:
        seq = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
        out = {"input_ids": ids, "attention_mask": b["attention_mask"], "position_ids": seq}
    else:
        missing = [k for k in ("image_grid_thw", "mm_token_type_ids") if k not in b]
        if missing:
            raise InputError(f"an image batch without {missing} (the processor's outputs carry them)")
        grid, vc = b["image_grid_thw"], config.vision_config
        window_index, cu_window = vision_utils.get_vision_window_index(
            grid, vc.spatial_merge_size, vc.window_size, vc.patch_size
        )
        out = {
            "input_ids": ids,
            "attention_mask": b["attention_mask"],
            "position_ids": _rope_index(config, b),
            "pixel_values": b["pixel_values"].float(),
            "vision_position_ids": vision_utils.get_vision_position_ids(grid, vc.spatial_merge_size),
            "cu_seqlens": vision_utils.get_vision_cu_seqlens(grid),
            "window_index": window_index,
            "cu_window_seqlens": cu_window,
        }
    missing = sorted(set(names or ()) - set(out))
    if missing:
        raise InputError(f"the graph takes {missing}, which this batch does not give (an image batch's)")
    return {k: np.ascontiguousarray(v.numpy()) for k, v in out.items() if names is None or k in names}


def _masked_vision_attention(
    self: qwen.Qwen2_5_VLVisionAttention,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' vision attention with the per-window loop replaced by one masked call: a
    token's segment is how many window ends lie at or before it, and it attends to its segment."""
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    index = torch.ones_like(hidden_states[:, 0], dtype=torch.long).cumsum(0) - 1
    segment = (index[:, None] >= cu_seqlens[None, 1:].long()).sum(-1)
    mask = (segment[:, None] == segment[None, :])[None, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(n, -1).contiguous())


def _inner(self: qwen.Qwen2_5_VLModel, input_ids, attention_mask, position_ids, *vision) -> torch.Tensor:
    embeds = self.language_model.embed_tokens(input_ids)
    if vision:
        pixel_values, positions, cu_seqlens, window_index, cu_window = vision
        image = self.visual(
            pixel_values,
            grid_thw=None,
            position_ids=positions,
            cu_seqlens=cu_seqlens,
            window_index=window_index,
            cu_window_seqlens=cu_window,
        ).pooler_output
        embeds = embeds.masked_scatter((input_ids == self.config.image_token_id)[..., None], image)
    return self.language_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def _outer(self: torch.nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return self.lm_head(self.model(*args))


@contextlib.contextmanager
def serving_forwards(model: torch.nn.Module) -> Iterator[None]:
    """``model(*graph inputs) -> logits`` while inside (positional, in :func:`input_names`' order)."""
    if not isinstance(getattr(model, "model", None), qwen.Qwen2_5_VLModel):
        raise InputError(f"{type(model).__name__}: the serving export takes a Qwen2.5-VL model")
    model.forward = types.MethodType(_outer, model)
    model.model.forward = types.MethodType(_inner, model.model)
    attention = qwen.Qwen2_5_VLVisionAttention.forward
    qwen.Qwen2_5_VLVisionAttention.forward = _masked_vision_attention
    try:
        yield
    finally:
        qwen.Qwen2_5_VLVisionAttention.forward = attention
        del model.forward, model.model.forward


def export_serving(
    model: torch.nn.Module, config: Qwen2_5_VLConfig, batch: Batch, path: Path, large: bool
) -> list[str]:
    """The serving graph at ``path`` (traced on ``batch``; every axis dynamic), its input names
    (those of :func:`input_names` some node reads); ``large``: initializers as external data."""
    import onnx

    names = input_names(batch)
    feeds = graph_inputs(config, batch)
    args = tuple(torch.from_numpy(feeds[k]) for k in names)
    raw = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent))
    try:
        with serving_forwards(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                args,
                str(raw / path.name),
                input_names=names,
                output_names=["logits"],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={k: AXES[k] for k in [*names, "logits"]},
            )
        proto = onnx.load(str(raw / path.name))
        inline_constant_identities(proto)
        save_onnx(proto, path, large)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    return [i.name for i in proto.graph.input]
