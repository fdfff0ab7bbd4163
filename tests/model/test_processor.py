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
