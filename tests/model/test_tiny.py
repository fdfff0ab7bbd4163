import torch

from op_sensitivity.inventory import op_inventory
from op_sensitivity.model.tiny import build_tiny_model, mrope_section
from op_sensitivity.model.tokenizer import train_tokenizer


def test_mrope_section_splits_half_head_dim_like_qwen():
    assert mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL-3B: head_dim 128
    assert sum(mrope_section(16)) == 8


def test_tiny_model_is_seeded_and_has_every_op_kind(repo_params):
    tok = train_tokenizer(["a red square"], 400)
    a = build_tiny_model(repo_params.model.tiny, tok, seed=0)
    b = build_tiny_model(repo_params.model.tiny, tok, seed=0)
    c = build_tiny_model(repo_params.model.tiny, tok, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    ops = op_inventory(a)
    counts = {}
    for op in ops:
        counts[(op.tower, op.type)] = counts.get((op.tower, op.type), 0) + 1
    # 2 vision blocks x 5 Linear + 2 merger Linear; 2 decoder layers x 7 Linear; tied lm_head.
    assert counts == {
        ("vision", "Conv3d"): 1,
        ("vision", "Linear"): 12,
        ("text", "Embedding"): 1,
        ("text", "Linear"): 14,
        ("lm_head", "Linear"): 1,
    }
    lm_head = next(o for o in ops if o.name == "lm_head")
    assert lm_head.tied_with == "model.language_model.embed_tokens"
    assert lm_head.shape == [len(tok), 64]
