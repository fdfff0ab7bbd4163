"""INC against the native engine on a carved copy, through the real stage scripts.

A model above ``crosscheck.whole_max_params`` (here the embedded default's sizes, 2 decoder layers
and 2 vision blocks, with the bound lowered to engage: the rule is the same at 3B width) is
checked on a copy of its first decoder layer and vision block and the vocabulary rows the batches
use: crosscheck runs both engines on it and validate runs INC's PTQ of the keep-list on it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from op_sensitivity.inventory import op_inventory
from op_sensitivity.model.carve import batch_tokens, load_carved
from op_sensitivity.model.source import load_model_dir, read_card
from tests.helpers import REPO, SAMPLE_ANNOTATIONS, SAMPLE_IMAGES, run_script

STAGES = REPO / "stages"
CARVE = {"whole_max_params": 100_000, "carve_layers": 1, "carve_vision_blocks": 1}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("carved")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["captions"].update(annotations=str(SAMPLE_ANNOTATIONS), images_dir=str(SAMPLE_IMAGES), count=4)
    data["sensitivity"].update(engine="native", confidence_batches=1)
    data["crosscheck"] = copy.deepcopy(CARVE)
    (ws / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (ws / "data/onnx").mkdir(parents=True)
    for stage in ("prepare_captions", "load_model", "sensitivity", "curve", "fallback_list"):
        code, err = run_script(STAGES / f"{stage}.py", [], ws)
        assert code == 0, err
    for stage, extra in (("crosscheck", ["--runtime", "reports/runtime/crosscheck.json"]), ("validate", [])):
        code, err = run_script(STAGES / f"{stage}.py", extra, ws)
        assert code == 0, err
    return ws


def test_crosscheck_runs_both_engines_on_the_carved_copy_and_says_so(workspace):
    card = read_card(workspace / "models/qwen2_5_vl")
    assert card.params > CARVE["whole_max_params"]
    doc = json.loads((workspace / "reports/sensitivity/crosscheck.json").read_text())
    c = doc["compared"]
    assert c["model"] == "carved" and c["model_sha256"] == card.sha256
    depth = (c["decoder_layers"], c["of_decoder_layers"], c["vision_blocks"], c["of_vision_blocks"])
    assert depth == (1, 2, 1, 2)
    assert c["source_params"] == card.params and c["params"] < card.params and c["vocab"] < c["of_vocab"]
    assert c["whole_max_params"] == CARVE["whole_max_params"]
    # every op of the copy: patch embedding + 1 vision block x 5 + merger 2 + embedding + 1 layer x 7
    # + lm_head; the int8 kernels give INC's values to the bit
    for phase in ("fallback", "requant"):
        v = doc["phases"][phase]
        assert v["ops"] == 17 and v["spearman"] == 1.0 and v["max_rel_diff"] == 0.0
    assert doc["passes_bar"] and doc["candidate"]["arithmetic"] == "int8_kernels"
    runtime = json.loads((workspace / "reports/runtime/crosscheck.json").read_text())
    passes = runtime["passes"]
    assert [(p["model"], p["engine"]) for p in passes] == [("carved", "native"), ("carved", "inc")]
    assert all(p["ops"] == 17 and p["model_params"] == c["params"] for p in passes)
    assert runtime["seconds"] == round(sum(sum(p["seconds"].values()) for p in passes), 3)


def test_validate_checks_inc_ptq_on_the_same_carved_copy(workspace):
    doc = json.loads((workspace / "reports/validation/validation.json").read_text())
    inc = doc["inc_ptq"]
    c = inc["compared"]
    assert c["model"] == "carved" and (c["decoder_layers"], c["vision_blocks"]) == (1, 1)
    keep_list = json.loads((workspace / "reports/fallback/fallback_ops.json").read_text())
    keep = [o["module"] for o in keep_list["ops"]]
    carved, _ = load_carved(workspace / "models/qwen2_5_vl", 1, 1, [])
    present = {op.name for op in op_inventory(carved)}
    assert c["keep_list_ops"] == [m for m in keep if m in present]
    assert c["int8_ops"] == len(present) - len(c["keep_list_ops"])  # every op scored in this pass
    assert inc["rel_diff"]["logit_se"] < 1e-4 and inc["rel_diff"]["kl"] < 1e-3, inc["rel_diff"]
    section = (workspace / "reports/validation/section.md").read_text()
    assert "on a copy carved from the model's weights (the first 1 of 2 decoder layers" in section


def test_the_carved_copy_holds_the_real_weights_under_the_original_names(workspace):
    model_dir = workspace / "models/qwen2_5_vl"
    full, processor, _ = load_model_dir(model_dir)
    batch = processor.encode(["a dog on a red sofa"], None)
    carved, carve = load_carved(model_dir, 1, 1, batch_tokens([batch]))
    weights = dict(full.named_parameters())
    rows = torch.tensor(carve.token_ids)
    for name, p in carved.named_parameters():
        expected = weights[name]
        if p.shape != expected.shape:  # the embedding / lm_head: the kept vocabulary rows, in id order
            expected = expected[rows]
        assert torch.equal(p, expected), name
    assert carved.lm_head.weight is carved.get_input_embeddings().weight  # the tie is kept
    assert not any(".layers.1." in n or ".blocks.1." in n for n, _ in carved.named_modules())
    remapped = carve.remap(batch)
    assert torch.equal(torch.tensor(carve.token_ids)[remapped["input_ids"]], batch["input_ids"])
    assert carved.config.image_token_id == carve.token_ids.index(full.config.image_token_id)
