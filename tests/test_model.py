import json
import shutil
from dataclasses import replace

import pytest
import torch
from PIL import Image

from op_sensitivity.coco_captions import load_calibration
from op_sensitivity.errors import InputError
from op_sensitivity.inventory import module_name, op_inventory, read_inventory, tower_of
from op_sensitivity.model_source import dir_sha256, load_model_dir, materialize_model
from op_sensitivity.processor import IMAGE_PAD, SPECIAL_TOKENS, ImageTextProcessor
from op_sensitivity.tiny_model import build_tiny_model, mrope_section
from op_sensitivity.tokenizer import train_tokenizer


def test_mrope_section_splits_half_head_dim_like_qwen():
    assert mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL-3B: head_dim 128
    assert sum(mrope_section(16)) == 8


def test_tokenizer_has_qwen_special_tokens_first():
    tok = train_tokenizer(["a red square", "two blue circles"], 400)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    ids = tok("a red square<|image_pad|>")["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert tok.decode(ids[:-1]) == "a red square"


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


def test_inventory_names_and_towers():
    assert tower_of("model.visual.blocks.0.attn.qkv") == "vision"
    assert tower_of("lm_head") == "lm_head"
    assert tower_of("model.language_model.layers.3.mlp.up_proj") == "text"
    assert module_name("lm_head.module") == "lm_head"
    assert module_name("model.visual.merger.mlp.0") == "model.visual.merger.mlp.0"


def test_materialized_dir_loads_back_identically(small_model_dir, calibration_dir):
    model, processor, card = load_model_dir(small_model_dir)
    assert card.random_weights and card.source == "tiny" and card.sha256 == dir_sha256(small_model_dir)
    assert card.params == sum(p.numel() for p in model.parameters())
    inv = read_inventory(small_model_dir.parent / "op_inventory.json")
    assert [o.name for o in inv] == [o.name for o in op_inventory(model)]
    _, records = load_calibration(calibration_dir)
    with Image.open(calibration_dir / records[0].image) as im:
        batch = processor.encode([records[0].caption], [im.convert("RGB")])
    grid = batch["image_grid_thw"][0]
    n_image_tokens = int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)).sum())
    assert n_image_tokens == int(grid.prod()) // 4
    assert batch["pixel_values"].shape[0] == int(grid.prod())
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


def test_text_only_and_padded_batches(small_model_dir, calibration_dir):
    model, processor, _ = load_model_dir(small_model_dir)
    _, records = load_calibration(calibration_dir)
    text = processor.encode([r.caption for r in records[:2]], None)
    assert set(text) == {"input_ids", "attention_mask"}
    images = [Image.open(calibration_dir / r.image).convert("RGB") for r in records[:2]]
    batch = processor.encode([r.caption for r in records[:2]], images)
    assert batch["input_ids"].shape[0] == 2 and batch["image_grid_thw"].shape == (2, 3)
    with torch.no_grad():
        out = model(**batch).logits
    # Right padding must not change a sample's logits on its real tokens.
    single = processor.encode([records[0].caption], images[:1])
    n = int(single["attention_mask"].sum())
    with torch.no_grad():
        alone = model(**single).logits
    torch.testing.assert_close(out[0, :n], alone[0, :n], rtol=1e-4, atol=1e-5)


def test_two_materializations_hash_the_same(tmp_path, small_model_params, calibration_dir, small_model_dir):
    _, card = materialize_model(small_model_params, calibration_dir, tmp_path / "again")
    assert card.sha256 == dir_sha256(small_model_dir)


def test_hf_dir_source_loads_a_snapshot(tmp_path, small_model_params, calibration_dir, small_model_dir):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(small_model_dir, snapshot)
    (snapshot / "op_sensitivity_model.json").unlink()  # a real snapshot has no card
    params = replace(small_model_params, source="hf_dir", hf_dir=snapshot)
    model, card = materialize_model(params, calibration_dir, tmp_path / "out")
    assert card.source == "hf_dir" and not card.random_weights and card.origin == str(snapshot)
    ref, _, _ = load_model_dir(small_model_dir)
    assert all(
        torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (
            lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama"})),
            "model_type 'llama', expected 'qwen2_5_vl'",
        ),
        (lambda d: (d / "preprocessor_config.json").unlink(), "preprocessor_config.json missing"),
    ],
)
def test_bad_hf_dir_is_a_clear_error(
    tmp_path, small_model_params, calibration_dir, small_model_dir, breaks, message
):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(small_model_dir, snapshot)
    breaks(snapshot)
    params = replace(small_model_params, source="hf_dir", hf_dir=snapshot)
    with pytest.raises(InputError, match=message):
        materialize_model(params, calibration_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_processor_without_chat_template_is_an_error(tmp_path, small_model_dir):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(small_model_dir, snapshot)
    (snapshot / "chat_template.json").unlink()
    with pytest.raises(InputError, match="no chat template"):
        ImageTextProcessor.load(snapshot)
