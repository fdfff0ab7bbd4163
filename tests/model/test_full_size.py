import json

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from op_sensitivity.inventory import op_inventory
from op_sensitivity.model.full_size import full_size_config
from op_sensitivity.model.tokenizer import train_tokenizer


def test_full_size_architecture_matches_the_published_counts():
    tok = train_tokenizer(["a red square"], 400)
    config = full_size_config(tok)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    ops = op_inventory(model)
    kinds = {}
    for op in ops:
        kinds[op.type] = kinds.get(op.type, 0) + 1
    assert kinds == {"Linear": 415, "Conv3d": 1, "Embedding": 1}
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
    assert config.text_config.hidden_size == 2048 and config.vision_config.depth == 32
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert json.loads(json.dumps(config.to_dict()))["text_config"]["vocab_size"] == 151936
