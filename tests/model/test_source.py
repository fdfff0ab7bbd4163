import json
import shutil
from dataclasses import replace

import pytest
import torch
from PIL import Image

from op_sensitivity.data.calibration import load_calibration
from op_sensitivity.errors import InputError
from op_sensitivity.inventory import op_inventory, read_inventory
from op_sensitivity.model.processor import IMAGE_PAD
from op_sensitivity.model.source import CARD, dir_sha256, load_model_dir, materialize_model


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


def test_two_materializations_hash_the_same(tmp_path, small_model_params, calibration_dir, small_model_dir):
    _, _, card = materialize_model(small_model_params, tmp_path / "again")
    assert card.sha256 == dir_sha256(small_model_dir)


def test_hf_dir_source_loads_a_snapshot(tmp_path, small_model_params, calibration_dir, small_model_dir):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(small_model_dir, snapshot)
    (snapshot / "op_sensitivity_model.json").unlink()  # a real snapshot has no card
    params = replace(small_model_params, source="hf_dir", input=snapshot)
    model, _, card = materialize_model(params, tmp_path / "out")
    assert card.source == "hf_dir" and not card.random_weights and card.origin == str(snapshot)
    assert card.sha256 == dir_sha256(snapshot)  # the snapshot's own content hash
    ref, _, _ = load_model_dir(small_model_dir)
    assert all(
        torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True)
    )
    # No copy of the weights: the output holds only what the stage derives, and loads from the snapshot.
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert not any(n.endswith((".safetensors", ".bin")) for n in written) and "config.json" not in written
    assert sum(p.stat().st_size for p in (tmp_path / "out").iterdir()) < 50_000
    loaded, _, _ = load_model_dir(tmp_path / "out")
    assert all(
        torch.equal(a, b)
        for a, b in zip(ref.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    weights = snapshot / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="the snapshot changed since load_model hashed it"):
        load_model_dir(tmp_path / "out")


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
    params = replace(small_model_params, source="hf_dir", input=snapshot)
    with pytest.raises(InputError, match=message):
        materialize_model(params, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _card_edit(edit):
    def breaks(model_dir):
        card = json.loads((model_dir / CARD).read_text())
        edit(card)
        (model_dir / CARD).write_text(json.dumps(card))

    return breaks


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        (lambda d: (d / CARD).write_text("{garbage"), f"{CARD}: not valid JSON"),
        (lambda d: (d / CARD).write_text("[]"), f"{CARD}: expected a JSON object"),
        (_card_edit(lambda c: c.update(extra=1)), f"{CARD}: unknown key 'extra'"),
        (_card_edit(lambda c: c.pop("sha256")), f"{CARD}: key 'sha256' missing"),
        (_card_edit(lambda c: c.update(params="7")), f"{CARD}: params: expected int, got '7'"),
        (_card_edit(lambda c: c.update(seed=True)), f"{CARD}: seed: expected int or null"),
        (_card_edit(lambda c: c.update(sha256="abc")), f"{CARD}: sha256: expected 64 hex digits"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b""),
            "model.safetensors: not a readable safetensors",
        ),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
            "model.safetensors: not a readable safetensors",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "config.json").unlink(), "config.json: missing"),
    ],
)
def test_a_damaged_model_dir_is_a_clear_error(tmp_path, small_model_dir, breaks, message):
    """What load_model wrote, damaged afterwards: named before any loader meets it."""
    model_dir = tmp_path / "model"
    shutil.copytree(small_model_dir, model_dir)
    breaks(model_dir)
    with pytest.raises(InputError, match=message):
        load_model_dir(model_dir)


def test_a_directory_without_config_json_is_refused_not_given_a_default_config(tmp_path, small_model_dir):
    """transformers 5.24's ``from_pretrained`` on a directory without config.json returns the
    default Qwen2.5-VL config (image token 151655) without a word; load_config names the file."""
    from transformers import Qwen2_5_VLConfig

    from op_sensitivity.model.source import load_config

    (tmp_path / "export.json").write_text("{}")
    assert Qwen2_5_VLConfig.from_pretrained(tmp_path, local_files_only=True).image_token_id == 151655
    with pytest.raises(InputError, match=r"config\.json: not found"):
        load_config(tmp_path)
    assert load_config(small_model_dir).image_token_id != 151655  # the model's own, through its card
