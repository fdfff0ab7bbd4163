"""The embedded default model: Qwen2.5-VL's architecture at toy sizes with seeded random weights.

Same classes as Qwen2.5-VL-3B (window + full attention vision blocks, patch merger, 3-axis
rotary text decoder, lm_head tied to embed_tokens as in the 3B), so every op type and every
code path of the real model is exercised in seconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ..params import TinyModelParams


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) like Qwen's [16, 24, 24] of 64."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(sizes: TinyModelParams, tokenizer: PreTrainedTokenizerBase) -> Qwen2_5_VLConfig:
    ids = tokenizer.convert_tokens_to_ids
    text = dict(sizes.text)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    vision = dict(sizes.vision)
    return Qwen2_5_VLConfig(
        text_config=dict(
            **text,
            vocab_size=len(tokenizer),
            max_position_embeddings=4096,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": mrope_section(head_dim),
                "rope_theta": 1e6,
            },
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            rms_norm_eps=1e-6,
        ),
        vision_config=dict(
            **vision,
            out_hidden_size=text["hidden_size"],
            fullatt_block_indexes=[vision["depth"] - 1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_model(
    sizes: TinyModelParams, tokenizer: PreTrainedTokenizerBase, seed: int
) -> Qwen2_5_VLForConditionalGeneration:
    """Same seed and sizes give bit-identical weights (CPU init, no threading in the RNG)."""
    config = tiny_config(sizes, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval()
