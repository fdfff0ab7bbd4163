import contextlib
import json

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.initialization import no_init_weights

from op_sensitivity.inventory import op_inventory
from op_sensitivity.model.full_size import full_size_config, init_like_transformers
from op_sensitivity.model.tiny import tiny_config
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


def _tiny(repo_params, build) -> Qwen2_5_VLForConditionalGeneration:
    config = tiny_config(repo_params.model.tiny, train_tokenizer(["a red square"], 400))
    with build():
        return Qwen2_5_VLForConditionalGeneration(config)


def test_init_like_transformers_gives_each_parameter_the_init_a_plain_build_gives(repo_params):
    """The plain build runs torch's reset_parameters, then transformers' init_weights over it;
    without the first, every parameter must come out of the same init: zeros stay zeros, ones
    ones, and random weights keep the std of normal(0, initializer_range)."""
    plain = _tiny(repo_params, contextlib.nullcontext)
    fast = _tiny(repo_params, no_init_weights)
    init_like_transformers(fast, seed=0)
    again = _tiny(repo_params, no_init_weights)
    init_like_transformers(again, seed=0)
    std = plain.config.text_config.initializer_range
    plain_params = dict(plain.named_parameters())
    kinds = set()
    for name, p in fast.named_parameters():
        ref = plain_params[name]
        assert torch.equal(p, dict(again.named_parameters())[name]), name  # the seed decides
        if torch.all(ref == 0):
            kind = "zeros"
        elif torch.all(ref == 1):
            kind = "ones"
        else:
            kind = "normal"
            assert abs(p.std().item() - std) < 0.2 * std and abs(ref.std().item() - std) < 0.2 * std, name
        assert kind != "zeros" or torch.all(p == 0), name
        assert kind != "ones" or torch.all(p == 1), name
        kinds.add(kind)
    assert kinds == {"zeros", "ones", "normal"}
    assert fast.lm_head.weight is fast.model.language_model.embed_tokens.weight


def test_a_parameter_init_weights_does_not_set_stops_the_build(repo_params):
    model = _tiny(repo_params, no_init_weights)
    model.model.visual.register_parameter("planted_scale", torch.nn.Parameter(torch.zeros(4)))
    with pytest.raises(RuntimeError, match=r"left 1 parameters unset .*model\.visual\.planted_scale"):
        init_like_transformers(model, seed=0)
