"""INC's own PTQ of a keep-list, saved by ``q_model.save`` and reloaded by INC's ``load``, scored on
the test split next to the native prediction and to the un-saved model (real INC, no mocks).

What the numbers say on the small model (float32, 1 vision block, 1 decoder layer, 6 test pairs,
one calibration batch): the reloaded model's logits equal the in-memory q_model's to the bit (the
file holds the packed int8 weights and every calibrated scale; INC's loader replays the same
conversion), and its metrics equal the native engine's prediction under ``inc_cpu`` to the bit
(same calibration, same observers, same torch quantized kernels). The bar allowed for the
prediction is validate's (``tests/validation/test_validate.py``): a relative difference below
1e-4 on logit_se and 1e-3 on kl, room for float summation order in the float parts (another CPU,
thread count or torch build), far below what one op's int8 error moves (the lists below differ
from all-int8 by several percent of logit_se).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from op_sensitivity.engines.inc_loop import (
    SAVED_MODEL,
    int8_and_fp32,
    load_q_model,
    ptq_logits,
    saved_config,
)
from op_sensitivity.errors import InputError
from op_sensitivity.fallback.exports import inc_op_name_dict
from op_sensitivity.inventory import read_inventory
from op_sensitivity.model.source import load_model_dir, read_card
from op_sensitivity.params import TARGET_SCHEMES
from op_sensitivity.quantize.base import Inputs, Runtime
from op_sensitivity.quantize.inc_ptq import (
    FORMAT,
    Inc,
    check_size,
    keep_fp32,
    quantized_modules,
)
from op_sensitivity.validation.inputs import open_measurer
from op_sensitivity.validation.measure import TEST
from tests.helpers import engine_reports, sensitivity_params

pytestmark = pytest.mark.xdist_group("quantize_inc")  # one worker builds the artifacts once

REL_LOGIT_SE, REL_KL = 1e-4, 1e-3  # validate's bar for INC's PTQ against the prediction (module doc)


@dataclass
class Checked:
    keep: list[str]
    quantize: list[str]
    record: dict[str, Any]
    path: Path
    runtime: Runtime
    measured: dict[str, float]  # the saved and reloaded model
    in_memory: dict[str, float]  # ptq_logits: INC's q_model, never saved
    predicted: dict[str, float]  # the native engine, inc_cpu
    same_logits: bool  # reloaded == in-memory, every test batch, to the bit


def _keep_lists(inventory) -> dict[str, list[str]]:
    """Decoder layer 0's q/k/v and lm_head (tied to the int8 embedding); the whole vision tower
    (lm_head quantized with its tied embedding)."""
    qkv = [
        o.name
        for o in inventory
        if ".self_attn." in o.name and o.name.endswith(("q_proj", "k_proj", "v_proj"))
    ]
    vision = [o.name for o in inventory if o.tower == "vision"]
    return {"qkv_lm_head": [*qkv, "lm_head"], "vision": vision}


@pytest.fixture(scope="module")
def checked(small_model_dir, calibration_dir, test_dir, tmp_path_factory) -> dict[str, Any]:
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    params = sensitivity_params(engine="native")
    assert params.native.scheme == TARGET_SCHEMES["inc"]
    ws = tmp_path_factory.mktemp("inc_target")
    report = engine_reports(small_model_dir, calibration_dir, params, ["native"], ws / "pass")["native"]
    target, out = Inc(), {}
    with open_measurer(params, 8, calibration_dir, test_dir, small_model_dir, report, TEST) as measurer:
        all_int8 = measurer.measure([])
        calibration = [{k: v.cpu() for k, v in b.items()} for b in measurer.calibration]
        batches = [b for b, _ in measurer.splits[TEST]]
        for name, keep in _keep_lists(inventory).items():
            quantize = [m for m in measurer.scored if m not in keep]
            inputs = Inputs(small_model_dir, quantize, calibration, ws / f"{name}-ws", 10**9)
            inputs.workspace.mkdir()
            record = target.write(inputs, ws / name)
            runtime = target.load(ws / name, inputs)
            model, _, _ = load_model_dir(small_model_dir)
            fp32 = inc_op_name_dict(keep_fp32(model, quantize))
            in_memory = ptq_logits(model, measurer.calibration, 8, fp32, inputs.workspace)
            same = all(torch.equal(runtime.forward(b), in_memory(b)) for b in batches)
            out[name] = Checked(
                keep,
                quantize,
                record,
                ws / name,
                runtime,
                measurer.measure_forward(runtime.forward),
                measurer.measure_forward(in_memory),
                measurer.measure(keep),
                same,
            )
    test_batch = {k: v.cpu() for k, v in batches[0].items()}
    return {"lists": out, "all_int8": all_int8, "model_dir": small_model_dir, "test_batch": test_batch}


def test_the_saved_model_quantizes_exactly_the_list_read_back_from_file_and_reloaded_modules(checked):
    for c in checked["lists"].values():
        assert sorted(p.name for p in c.path.iterdir()) == [SAVED_MODEL]  # what INC's save writes
        assert c.record["format"] == FORMAT and c.record["bytes"] == (c.path / SAVED_MODEL).stat().st_size
        config = saved_config(c.path)
        int8, fp32 = int8_and_fp32(config)
        assert set(int8) == set(c.quantize) == Inc().quantized_in(c.path)  # from the file
        assert set(fp32) == set(c.keep)
        assert config["framework"] == "pytorch_fx" and config["fx_sub_module_list"]  # sub-module tracing
        fp32_model, _, _ = load_model_dir(checked["model_dir"])
        model = load_q_model(c.path, fp32_model)
        types = quantized_modules(model)
        assert set(types) == set(c.quantize)  # from the reloaded model's module types
        assert types["model.visual.blocks.0.mlp.down_proj" if "lm_head" in c.keep else "lm_head"] == "Linear"
        for name in c.keep:
            m = model.get_submodule(name)
            m = m.module if isinstance(m, torch.fx.GraphModule) else m  # INC's tracing wrapper
            assert type(m) in (nn.Linear, nn.Conv3d) and m.weight.dtype == torch.float32, name


def test_the_reloaded_model_equals_the_in_memory_one_and_the_native_prediction(checked):
    """Saved + reloaded == in memory, to the bit; == the prediction within validate's bar (module doc)."""
    for name, c in checked["lists"].items():
        assert c.same_logits, name
        assert c.measured == c.in_memory, name
        assert c.measured["tokens"] == c.predicted["tokens"] > 0
        ratio_se = c.measured["logit_se"] / c.predicted["logit_se"]
        ratio_kl = c.measured["kl"] / c.predicted["kl"]
        assert abs(ratio_se - 1) < REL_LOGIT_SE and abs(ratio_kl - 1) < REL_KL, (name, ratio_se, ratio_kl)
        # the list changes what is measured: not the all-int8 model
        assert c.measured["logit_se"] != pytest.approx(checked["all_int8"]["logit_se"], rel=1e-3)


def test_the_runtime_facts_are_read_off_the_reloaded_model(checked):
    c = checked["lists"]["qkv_lm_head"]
    facts = c.runtime.facts()
    assert facts["loader"].startswith("neural_compressor.utils.pytorch.load")
    assert "Linear: qint8 per_channel_affine" in facts["weights"]
    assert "Embedding: quint8 per_channel_affine_float_qparams" in facts["weights"]
    assert facts["inputs"].startswith("quint8 per tensor, static")
    assert f"({torch.backends.quantized.engine})" in facts["matmul"]
    assert "fx_sub_module_list" in facts["notes"][0]


# A user's serving process, as docs/deploy.md shows it: the float model from its directory, the
# artifact loaded, one forward of a saved batch; nothing of the project imported before.
SERVE = """
import sys, torch
from transformers import Qwen2_5_VLForConditionalGeneration
model_dir, saved, batch, out = sys.argv[1:]
fp32 = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
{load}
with torch.no_grad():
    torch.save(model(**torch.load(batch)).logits, out)
"""
OURS = "from op_sensitivity.quantize.inc_ptq import load_inc\nmodel = load_inc(saved, fp32)"
INC_ALONE = "from neural_compressor.utils.pytorch import load\nmodel = load(saved, fp32)"


def _serve(load: str, c: Checked, model_dir: Path, batch: dict, tmp_path: Path):
    torch.save(batch, tmp_path / "batch.pt")
    script = textwrap.dedent(SERVE).format(load=load)
    args = [str(model_dir), str(c.path), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")]
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    return run, tmp_path / "logits.pt"


def test_the_documented_call_serves_the_artifact_in_a_fresh_process(checked, tmp_path):
    """load_inc in a new interpreter gives the stage's measured logits to the bit; INC's load alone
    builds a model whose first forward fails in the patch embedding (engines.inc_loop.load_q_model)."""
    c, batch = checked["lists"]["qkv_lm_head"], checked["test_batch"]
    run, logits = _serve(OURS, c, checked["model_dir"], batch, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.equal(torch.load(logits), c.runtime.forward(batch))
    run, _ = _serve(INC_ALONE, c, checked["model_dir"], batch, tmp_path)
    assert run.returncode != 0 and "'function' object has no attribute 'dtype'" in run.stderr


def test_a_model_above_the_size_bound_is_refused_before_any_work(small_model_dir):
    params = read_card(small_model_dir).params
    assert check_size(small_model_dir, params) == params
    with pytest.raises(InputError, match=r"crosscheck\.whole_max_params .*GiB.*not a deployable model"):
        check_size(small_model_dir, max_params=params - 1)


def test_names_that_are_not_quantizable_modules_are_refused(small_model_dir):
    model, _, _ = load_model_dir(small_model_dir)
    with pytest.raises(InputError, match="not quantizable modules"):
        keep_fp32(model, ["model.language_model.norm"])


def test_a_directory_without_inc_saved_model_is_refused(tmp_path):
    with pytest.raises(InputError, match=f"no {SAVED_MODEL}"):
        Inc().quantized_in(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / SAVED_MODEL)
    with pytest.raises(InputError, match="no best_configure"):
        Inc().quantized_in(tmp_path)
