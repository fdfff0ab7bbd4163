"""A Qwen2.5-VL with planted massive activations, as reported for real LLMs.

Sun et al. (2024, "Massive activations in large language models") find a few residual-stream
channels 100-1000x the rest from an early layer on; Wei et al. (2022, "Outlier suppression") find
that the norms' scale (gamma) is what passes such channels into the next linear layers' inputs.
Planted here the same way, on a seeded random model with two decoder layers: layer ``WRITER``'s
attention adds ``CHANNELS`` to the residual, the same value at every token (as the massive
activations are: near-constant, bias-like), ``RESIDUAL`` times the median of the other channels;
the two norms of layer ``NAMED`` pass them into its five input linears at ``INPUT`` times
the rest (the ``MASSIVE`` ops), every other norm that reads them brings them back to size. The
float model stays near the original (``plant_massive`` measures how near): the norms' other
channels are rescaled by the RMS the massive channels add, and the named linears' columns that
read them are divided by ``INPUT``.
Under per-tensor int8 activations the rest of those inputs round to a few codes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from PIL import Image

from op_sensitivity.data.calibration import load_calibration
from op_sensitivity.model.source import CARD, dir_sha256, load_model_dir, read_card

TEXT = "model.language_model"
WRITER, NAMED = 0, 1
CHANNELS = (7, 41)
RESIDUAL = 1000.0
INPUT = 300.0
READERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
MASSIVE = {f"{TEXT}.layers.{NAMED}.{op}" for ops in READERS.values() for op in ops}


@contextmanager
def _inputs(model, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The first positional input of each named module at the forwards run inside the block."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].detach().float()))
        for n in names
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _captured(model, batch: dict, names: list[str]) -> dict[str, torch.Tensor]:
    with _inputs(model, names) as seen, torch.no_grad():
        model(**batch)
    return dict(seen)


def _ratio(x: torch.Tensor) -> float:
    """Mean |x| of the massive channels over the median |x| of the others (all tokens)."""
    rest = torch.ones(x.shape[-1], dtype=torch.bool)
    rest[list(CHANNELS)] = False
    return float(x[..., list(CHANNELS)].abs().mean() / x[..., rest].abs().median())


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def _writer(model, batch: dict, layer: str, rest: torch.Tensor) -> None:
    """Make the layer's attention add a constant to the residual: ``RESIDUAL * rest`` at each of
    ``CHANNELS``, about 0 elsewhere. A constant ``d`` added to v_proj's bias passes attention
    unchanged (its weights sum to 1); o_proj is edited to send the direction of ``d`` (as the
    heads repeat it) to the massive channels instead. ``d`` is 100x the attention output's
    typical norm, so the rest of that output leaks into them at about 1 %."""
    attn = dict(model.named_modules())[f"{layer}.self_attn"]
    out = _captured(model, batch, [f"{layer}.self_attn.o_proj"])[f"{layer}.self_attn.o_proj"]
    head_dim = attn.head_dim
    kv_heads = attn.v_proj.out_features // head_dim
    repeat = attn.o_proj.in_features // attn.v_proj.out_features
    d = torch.randn(attn.v_proj.out_features, generator=torch.Generator().manual_seed(0))
    spread = d.view(kv_heads, head_dim).repeat_interleave(repeat, dim=0).flatten()
    scale = 100.0 * out.norm(dim=-1).median() / spread.norm()
    d, spread = d * scale, spread * scale
    u = spread / spread.norm()
    target = torch.zeros(attn.o_proj.out_features)
    target[list(CHANNELS)] = RESIDUAL * rest
    with torch.no_grad():
        w = attn.o_proj.weight.float()
        w = w - torch.outer(w @ u, u) + torch.outer(target, u) / spread.norm()
        attn.o_proj.weight.copy_(w.to(attn.o_proj.weight.dtype))
        attn.v_proj.bias += d.to(attn.v_proj.bias.dtype)


def plant_massive(model, batch: dict) -> dict[str, float]:
    """Plant them in place (float32 model). Returns, measured on ``batch``: the ratios; the float
    logits' largest change against the original, relative to their largest magnitude; the share of
    positions whose most likely token is unchanged. The float model does change: after the
    massive channels every norm divides a token by about the same RMS, not by its own (what
    such channels do to a real model's norms too)."""
    modules = dict(model.named_modules())
    layers = [f"{TEXT}.layers.{i}" for i in range(model.config.text_config.num_hidden_layers)]
    norms = [f"{layers[WRITER]}.post_attention_layernorm"]
    norms += [f"{lay}.{n}" for lay in layers[WRITER + 1 :] for n in READERS] + [f"{TEXT}.norm"]
    with torch.no_grad():
        before_logits = model(**batch).logits.float()
    before = _captured(model, batch, norms)
    residual = before[norms[1]]  # the residual stream after the writer's layer
    rest = residual[..., [j for j in range(residual.shape[-1]) if j not in CHANNELS]].abs().median()
    _writer(model, batch, layers[WRITER], rest)
    stats = {"residual_ratio": _ratio(_captured(model, batch, norms[1:2])[norms[1]])}
    for name in norms:  # in forward order: each one sees the edits before it
        x = _captured(model, batch, [name])[name]
        norm = modules[name]
        with torch.no_grad():
            massive = torch.zeros_like(norm.weight, dtype=torch.bool)
            massive[list(CHANNELS)] = True
            norm.weight[~massive] *= (_rms(x) / _rms(before[name])).mean().to(norm.weight.dtype)
            y = x / _rms(x) * norm.weight.float()
            named = name.startswith(f"{layers[NAMED]}.")
            target = y[..., ~massive].abs().median() * (INPUT if named else 1.0)
            for c in CHANNELS:
                norm.weight[c] *= target / y[..., c].abs().mean()
            if named:
                for op in READERS[name.rsplit(".", 1)[1]]:
                    modules[f"{layers[NAMED]}.{op}"].weight[:, list(CHANNELS)] /= INPUT
    ops = _captured(model, batch, sorted(MASSIVE))
    stats["input_ratio"] = min(_ratio(x) for x in ops.values())
    with torch.no_grad():
        after_logits = model(**batch).logits.float()
    stats["logits_change"] = float((after_logits - before_logits).abs().max() / before_logits.abs().max())
    stats["argmax_kept"] = float((after_logits.argmax(-1) == before_logits.argmax(-1)).float().mean())
    return stats


def probe(processor, calibration_dir: Path) -> dict:
    """The first calibration pair, encoded as the pipeline encodes it."""
    _, records = load_calibration(calibration_dir)
    first = records[0]
    return processor.encode([first.caption], [Image.open(calibration_dir / first.image).convert("RGB")])


def massive_copy(model_dir: Path, inventory: Path, out: Path, calibration_dir: Path) -> tuple[Path, dict]:
    """A copy of a model dir (two decoder layers at least) with them planted and its card re-hashed,
    the inventory beside it; also the ratios measured on the first calibration pair."""
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model_dir, out)
    shutil.copy(inventory, out.parent / "op_inventory.json")
    model, processor, _ = load_model_dir(out)
    stats = plant_massive(model, probe(processor, calibration_dir))
    model.save_pretrained(out)
    card = replace(read_card(out), sha256=dir_sha256(out))
    (out / CARD).write_text(json.dumps(asdict(card)))
    return out, stats
