import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from op_sensitivity.inventory import op_inventory
from op_sensitivity.model.full_size import full_size_config
from op_sensitivity.model.tokenizer import train_tokenizer


@pytest.mark.parametrize(
    ("size", "params", "text_linear", "hidden", "vocab", "tied"),
    [
        ("3b", 3_754_622_976, 252, 2048, 151936, True),
        ("7b", 8_292_166_656, 196, 3584, 152064, False),
    ],
)
def test_full_size_architectures_match_the_published_counts(size, params, text_linear, hidden, vocab, tied):
    tok = train_tokenizer(["a red square"], 400)
    config = full_size_config(tok, size)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    kinds = {}
    for op in op_inventory(model):
        kinds[(op.type, op.tower)] = kinds.get((op.type, op.tower), 0) + 1
    assert kinds == {
        ("Conv3d", "vision"): 1,
        ("Linear", "vision"): 162,  # 32 blocks x 5 + 2 merger layers, the same vision tower in both
        ("Embedding", "text"): 1,
        ("Linear", "text"): text_linear,  # layers x 7
        ("Linear", "lm_head"): 1,
    }
    assert sum(p.numel() for p in model.parameters()) == params
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) is tied
    assert config.text_config.hidden_size == hidden and config.vision_config.depth == 32
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert json.loads(json.dumps(config.to_dict()))["text_config"]["vocab_size"] == vocab
