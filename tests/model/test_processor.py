import shutil

import pytest
import torch
from PIL import Image

from op_sensitivity.data.calibration import load_calibration
from op_sensitivity.errors import InputError
from op_sensitivity.model.batches import build_batches, build_eval_batches
from op_sensitivity.model.processor import ImageTextProcessor
from op_sensitivity.model.source import load_model_dir


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


def test_batches_follow_the_manifest_and_the_mode(small_model_dir, calibration_dir):
    _, processor, _ = load_model_dir(small_model_dir)
    _, records = load_calibration(calibration_dir)
    image_batches = build_batches(records[:3], calibration_dir, processor, "image_caption", 2)
    assert [b["input_ids"].shape[0] for b in image_batches] == [2, 1]
    first = processor.encode(
        [records[0].caption, records[1].caption],
        [Image.open(calibration_dir / r.image).convert("RGB") for r in records[:2]],
    )
    assert torch.equal(image_batches[0]["input_ids"], first["input_ids"])
    text_batches = build_batches(records[:2], calibration_dir, processor, "text_only", 1)
    assert all("pixel_values" not in b for b in text_batches)


def test_processor_without_chat_template_is_an_error(tmp_path, small_model_dir):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(small_model_dir, snapshot)
    (snapshot / "chat_template.json").unlink()
    with pytest.raises(InputError, match="no chat template"):
        ImageTextProcessor.load(snapshot)


def test_target_mask_covers_exactly_the_caption_tokens(small_model_dir, calibration_dir):
    _, processor, _ = load_model_dir(small_model_dir)
    _, records = load_calibration(calibration_dir)
    for mode in ("image_caption", "text_only"):
        (batch, mask), *_ = build_eval_batches(records[:2], calibration_dir, processor, mode, 2)
        assert mask.shape == batch["input_ids"].shape and mask.any(dim=1).all()
        for b, record in enumerate(records[:2]):
            ids = batch["input_ids"][b][mask[b]]
            assert processor.tokenizer.decode(ids) == record.caption, mode
            # Only a contiguous run, after the prompt: position 0 never predicts a caption token.
            positions = mask[b].nonzero().flatten()
            assert positions.min() > 0 or mode == "text_only"
            assert (positions.diff() == 1).all()


def test_image_batches_give_the_model_its_3d_rotary_positions(small_model_dir, calibration_dir):
    """The batch marks the image's tokens (``mm_token_type_ids``, as transformers' own processor
    does), so Qwen2.5-VL places each image token at its (time, height, width) position. Without
    it transformers 5.24 passes no positions to the decoder, which then numbers every token in
    sequence: the logits differ, and the model is not the one deployed."""
    model, processor, _ = load_model_dir(small_model_dir)
    _, records = load_calibration(calibration_dir)
    images = [Image.open(calibration_dir / r.image).convert("RGB") for r in records[:2]]
    batch = processor.encode([r.caption for r in records[:2]], images)
    ids = batch["input_ids"]
    assert torch.equal(batch["mm_token_type_ids"], (ids == model.config.image_token_id).long())
    n_image = [int(g.prod()) // processor.merge_size**2 for g in batch["image_grid_thw"]]
    assert batch["mm_token_type_ids"].sum(dim=1).tolist() == n_image

    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(position_ids=kw.get("position_ids")), with_kwargs=True
    )
    try:
        with torch.no_grad():
            logits = model(**batch).logits
            without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
            sequential = model(**without).logits
            assert seen["position_ids"] is None  # transformers' fallback: 0, 1, 2, ... on all 3 axes
            model(**batch)
    finally:
        hook.remove()
    expected, _ = model.model.get_rope_index(
        ids,
        image_grid_thw=batch["image_grid_thw"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
    )
    positions = seen["position_ids"]
    assert positions.shape == (3, *ids.shape) and torch.equal(positions, expected)
    image = batch["mm_token_type_ids"][0].bool()
    # an image's tokens share their time position and spread over height and width
    assert positions[0, 0, image].unique().numel() == 1 and positions[1, 0, image].unique().numel() > 1
    assert not torch.allclose(logits, sequential)
