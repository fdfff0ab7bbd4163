"""The full-size Qwen2.5-VL-3B- and 7B-Instruct architectures with seeded random weights.

Why: speed and memory of the sensitivity engines must be measured at the real widths (3B: 2048
hidden, 36 layers, 32 vision blocks, 151936 vocab; 7B: 3584 hidden, 28 layers, untied lm_head)
without the real weights, which cannot be downloaded here. The published config values ship in
``configs/`` (``model.full_size`` picks one). Every output built from them is labelled
``random_weights: true``.

The special-token ids of the config are replaced by those of the tokenizer trained on the
captions (the processor inserts the tokenizer's ``<|image_pad|>``); the vocabulary size stays
the published one, so the embedding and lm_head keep their real shapes.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.initialization import no_init_weights

CONFIG_FILES = {"3b": "qwen2_5_vl_3b_instruct.json", "7b": "qwen2_5_vl_7b_instruct.json"}
TOKEN_FIELDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "bos_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|>",
}


def published_config(size: str = "3b") -> dict[str, Any]:
    text = resources.files("op_sensitivity.model").joinpath("configs", CONFIG_FILES[size]).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def full_size_config(tokenizer: PreTrainedTokenizerBase | None = None, size: str = "3b") -> Qwen2_5_VLConfig:
    values = published_config(size)
    if tokenizer is not None:
        values.update({k: tokenizer.convert_tokens_to_ids(t) for k, t in TOKEN_FIELDS.items()})
    values.pop("architectures", None)
    values.pop("model_type", None)
    return Qwen2_5_VLConfig(**values)


def build_full_size_model(
    tokenizer: PreTrainedTokenizerBase, seed: int, size: str = "3b"
) -> Qwen2_5_VLForConditionalGeneration:
    """~3.75 B parameters in bfloat16, as the published checkpoint stores them (7.5 GB): transformers
    initialises the language model in the config's bfloat16 and the vision tower in float32, and
    the whole model is then cast."""
    config = full_size_config(tokenizer, size)
    with no_init_weights():
        model = Qwen2_5_VLForConditionalGeneration(config)
    init_like_transformers(model, seed)
    return model.to(torch.bfloat16).eval()


def init_like_transformers(model: PreTrainedModel, seed: int) -> None:
    """transformers' own init (``init_weights``: normal(0, initializer_range) weights, zero biases,
    unit norms, tied lm_head) without torch's ``reset_parameters`` before it.

    Why: a model built the plain way runs torch's kaiming_uniform_ on every Linear and Conv, and
    transformers then overwrites every one of those weights: at 3B on 2 cores the build took 46 s
    with that pass and 28 s without (benchmarks/full_size_build.py). The model is built under
    transformers' ``no_init_weights`` (uninitialised memory), so every parameter is set to NaN
    first: one that ``init_weights`` leaves alone (a transformers change, a new module) stops the
    build here instead of shipping whatever the memory held.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights()
    missed = [n for n, p in model.named_parameters() if bool(torch.isnan(p).any())]
    if missed:
        raise RuntimeError(
            f"transformers' init_weights left {len(missed)} parameters unset (first: {missed[:3]}): "
            "the random full-size model would hold uninitialised memory"
        )
