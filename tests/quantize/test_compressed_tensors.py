"""A real compressed-tensors W8A8 checkpoint of a keep-list, loaded by transformers and scored on
the test split next to the native engine's prediction for the same list (no mocks).

What the numbers say on the small model (float32, 1 vision block, 1 decoder layer, 6 test pairs):
with the vision tower kept, checkpoint and prediction agree to the bit (the text tower's inputs are
[batch, tokens, hidden]: one scale per token on both sides). With vision ops quantized the
checkpoint does more damage: compressed-tensors' token strategy gives a 2-D input (the vision
tower's [patches of all images, hidden]) one scale for the whole tensor, the native engine (and
vLLM's kernel) one per row. On this random tiny model every next-token distribution is nearly
flat, so KL (~1e-8) and top1 (1.0) cannot tell configurations apart; logit_se can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from op_sensitivity.atomic import TMP_TAG
from op_sensitivity.errors import InputError
from op_sensitivity.fallback.exports import llmcompressor_ignore
from op_sensitivity.inventory import read_inventory
from op_sensitivity.model.fused import probe_batch
from op_sensitivity.model.processor import ImageTextProcessor
from op_sensitivity.quantize.compressed_tensors import (
    FORMAT,
    kept_in_checkpoint,
    load_checkpoint,
    quantized_modules,
    runtime,
    write_checkpoint,
)
from op_sensitivity.quantize.hf_checkpoint import logits_of
from op_sensitivity.validation.inputs import open_measurer
from op_sensitivity.validation.measure import TEST, Scorer
from tests.helpers import engine_reports, sensitivity_params

pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (.[ct])")
pytestmark = pytest.mark.xdist_group("quantize_ct")  # one worker builds the checkpoints once

TEXT_O = "model.language_model.layers.0.self_attn.o_proj"  # quantized in every list, input 3-D
VISION_PROJ = "model.visual.blocks.0.attn.proj"  # quantized unless the vision tower is kept, input 2-D


@dataclass
class Checked:
    keep: list[str]
    ignore: list[str]
    record: dict[str, Any]
    path: Path
    model: nn.Module
    predicted: dict[str, float]
    measured: dict[str, float]
    scorer: Scorer


def _keep_lists(inventory) -> dict[str, list[str]]:
    """A whole fused group (q/k/v of decoder layer 0) plus lm_head; only lm_head (the scheme's own
    skip, tied to the embedding); and the first list with every vision Linear added."""
    group = next(o.fused_group for o in inventory if o.fused_group and ".self_attn." in o.fused_group)
    qkv = [o.name for o in inventory if o.fused_group == group]
    vision = [o.name for o in inventory if o.type == "Linear" and o.tower == "vision"]
    return {"chosen": [*qkv, "lm_head"], "all_int8": ["lm_head"], "vision_kept": [*vision, *qkv, "lm_head"]}


@pytest.fixture(scope="module")
def checked(small_model_dir, calibration_dir, test_dir, tmp_path_factory) -> dict[str, Checked]:
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    params = sensitivity_params(engine="native")
    params = replace(params, native=replace(params.native, scheme="llmcompressor_w8a8"))
    ws = tmp_path_factory.mktemp("ct_w8a8")
    report = engine_reports(small_model_dir, calibration_dir, params, ["native"], ws / "pass")["native"]
    out = {}
    with open_measurer(params, 8, calibration_dir, test_dir, small_model_dir, report, TEST) as measurer:
        for name, keep in _keep_lists(inventory).items():
            ignore = llmcompressor_ignore(keep, inventory)
            record = write_checkpoint(small_model_dir, ignore, ws / name)
            model = load_checkpoint(ws / name)
            predicted = measurer.measure([m for m in keep if m in measurer.scored])  # lm_head: not scored
            measured = measurer.measure_forward(logits_of(model))
            scorer = measurer.scorer()
            out[name] = Checked(keep, ignore, record, ws / name, model, predicted, measured, scorer)
    return out


def _linear(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_the_checkpoint_leaves_exactly_the_kept_modules_unquantized(checked, small_model_dir):
    chosen = checked["chosen"]
    assert len(chosen.keep) == 4 and not any(i.startswith("re:") for i in chosen.ignore)
    assert any(i.startswith("re:") for i in checked["vision_kept"].ignore)  # the vision block, whole
    for c in checked.values():
        linear = _linear(c.model)
        assert kept_in_checkpoint(c.path) == set(c.keep)  # read back from tensors + config
        assert c.record["quantized"] == [n for n in linear if n not in c.keep]
        assert c.record["ignored"] == [n for n in linear if n in c.keep]
        assert c.record["format"] == FORMAT and c.record["dtype"] == "float32"
        assert set(quantized_modules(c.model)) == set(linear) - set(c.keep)  # what transformers built
        config = json.loads((c.path / "config.json").read_text())["quantization_config"]
        assert config["format"] == FORMAT and config["quant_method"] == "compressed-tensors"
        # both name spaces: the saved tensors' (vLLM maps them) and the modules' (transformers matches them)
        assert set(c.keep) <= set(config["ignore"])
        q_proj = "model.language_model.layers.0.self_attn.q_proj"
        assert ("model.layers.0.self_attn.q_proj" in config["ignore"]) == (q_proj in c.keep)
    with safe_open(str(chosen.path / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.self_attn.o_proj.weight").get_dtype() == "I8"
        keys = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.weight_scale" not in keys
        assert "model.layers.0.self_attn.o_proj.weight_zero_point" not in keys  # symmetric: none
    processor = ImageTextProcessor.load(chosen.path)  # the model directory's processor files, as they were
    assert processor.chat_template == ImageTextProcessor.load(small_model_dir).chat_template


def _sources(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def test_int8_weights_make_the_checkpoint_smaller(checked, small_model_dir):
    bytes_ = {name: _sources(c.path) for name, c in checked.items()}
    assert bytes_["all_int8"] < bytes_["chosen"] < bytes_["vision_kept"] < _sources(small_model_dir)
    assert checked["all_int8"].record["bytes"] > bytes_["all_int8"]  # the processor files too


def _caught(model: nn.Module, names: list[str], batch: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Each module's input and output on ``batch`` (its first call)."""
    caught: dict[str, tuple] = {}

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            caught.setdefault(name, (args[0].detach(), out.detach()))

        return record

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            logits_of(model)(batch)
    finally:
        for h in hooks:
            h.remove()
    return caught


def test_the_loaded_model_computes_int8_weights_and_dynamic_int8_inputs(checked):
    """Each quantized Linear runs on codes x scale as stored, its input quantized per call: one
    scale per token of a 3-D input, one for the whole of a 2-D one (compressed-tensors' token
    strategy keeps dims 0 and 1)."""
    c = checked["chosen"]
    ran = runtime(c.model)
    assert ran["loader"] == "CompressedTensorsHfQuantizer" and ran["dequantize"] is False
    assert set(ran["quantized"]) == set(_linear(c.model)) - set(c.keep)
    caught = _caught(c.model, [TEXT_O, VISION_PROJ], probe_batch(ImageTextProcessor.load(c.path)))
    with safe_open(str(c.path / "model.safetensors"), framework="pt") as f:
        for name, key in (
            (TEXT_O, "model.layers.0.self_attn.o_proj"),
            (VISION_PROJ, "visual.blocks.0.attn.proj"),
        ):
            module = c.model.get_submodule(name)
            weight = f.get_tensor(f"{key}.weight").float() * f.get_tensor(f"{key}.weight_scale")
            assert torch.equal(module.weight, weight)
            x, out = caught[name]
            amax = x.abs().amax(dim=-1, keepdim=True) if x.dim() == 3 else x.abs().amax()
            scale = amax / 127.5
            xq = torch.clamp(torch.round(x / scale), -128, 127) * scale
            torch.testing.assert_close(out, F.linear(xq, weight, module.bias), rtol=1e-6, atol=1e-6)
            assert not torch.allclose(out, F.linear(x, weight, module.bias), rtol=1e-6, atol=1e-6)
    assert caught[TEXT_O][0].dim() == 3 and caught[VISION_PROJ][0].dim() == 2


def test_with_the_vision_tower_kept_the_checkpoint_equals_the_prediction(checked):
    """The text tower's inputs are 3-D: the same per-token scales, weight codes and arithmetic."""
    c = checked["vision_kept"]
    for metric in ("kl", "nll", "logit_se"):
        assert c.measured[metric] == pytest.approx(c.predicted[metric], rel=1e-6, abs=1e-12), metric
    assert c.measured["top1"] == c.predicted["top1"] and c.measured["tokens"] == c.predicted["tokens"] > 0


@pytest.mark.parametrize("name", ["chosen", "all_int8"])
def test_quantized_vision_ops_cost_more_in_the_checkpoint_than_predicted(checked, name):
    """Bar: logit_se within [1, 2.5] x the prediction (measured 1.75x and 1.68x), the nll damage
    within [0.9, 3] x it (2.4x and 1.04x), top1 equal; KL only below 1e-7 (float32's floor here).
    The excess is the vision tower's one scale per 2-D tensor (every other quantizer agrees to the
    bit: the test above)."""
    c = checked[name]
    assert 1.0 <= c.measured["logit_se"] / c.predicted["logit_se"] <= 2.5
    # nll's damage (nll - nll_fp32: measured 6.5e-5 vs 2.7e-5 predicted, 2.4x; all-int8 4.5e-5 vs
    # 4.3e-5, 1.04x) resolves to ~1 % in float32; KL does not: the tiny model's logits are near
    # uniform and its KL sits at float32's floor (~1e-8; the measured one of "chosen" came out
    # -1.1e-9), so no relative bound holds for it and only its size is checked
    damage = {k: getattr(c, k)["nll"] - getattr(c, k)["nll_fp32"] for k in ("measured", "predicted")}
    assert damage["predicted"] > 1e-5
    assert 0.9 <= damage["measured"] / damage["predicted"] <= 3.0, damage
    assert abs(c.measured["kl"]) < 1e-7 and abs(c.predicted["kl"]) < 1e-7
    assert c.measured["top1"] == c.predicted["top1"]
    assert c.predicted["logit_se"] > checked["vision_kept"].predicted["logit_se"]


@pytest.mark.parametrize("name", ["chosen", "all_int8", "vision_kept"])
def test_the_stated_cause_measured_on_the_run_bounds_the_gap(checked, name):
    """The gap's cause, one activation scale per 2-D input, measured on the loaded model itself
    (``two_d_inputs_cause``): with the vision tower quantized it is the whole gap (the same model fed
    per row equals the prediction, 1e-6 relative), and the derived bar holds the measured figure
    (logit_se: measured 1.75x and 1.68x the prediction, the fixed bar 0.1 called both outside);
    with the vision tower kept the cause is 0 to the bit. Each module's forward is put back."""
    from op_sensitivity.quantize.causes import derived_bar, gap_bound
    from op_sensitivity.quantize.compressed_tensors import scaled_per_row, two_d_inputs_cause

    c = checked[name]
    quantized = runtime(c.model)["quantized"]
    forward = logits_of(c.model)
    [cause] = two_d_inputs_cause(c.model, quantized, c.scorer, "logit_se")
    m, p = c.measured["logit_se"], c.predicted["logit_se"]
    assert c.scorer.score(forward)["logit_se"] == m  # the forwards are the loaded ones again
    if name == "vision_kept":
        assert cause.value == 0.0 and derived_bar("logit_se", 1e-3, p, [cause])["bar"] == 1e-3
        return
    with torch.no_grad(), scaled_per_row(c.model, quantized):
        assert c.scorer.score(forward)["logit_se"] == pytest.approx(p, rel=1e-6)
    assert cause.value > 0 and abs(m - p) <= gap_bound(p, [cause])
    assert abs(m / p - 1) > 0.1 and abs(m / p - 1) <= derived_bar("logit_se", 1e-3, p, [cause])["bar"]


def test_a_list_it_cannot_write_is_refused_before_anything_is_written(checked, small_model_dir):
    """An entry matching no module (compressed-tensors would only warn and quantize the op), a tied
    lm_head left quantized, a list keeping every Linear: the previous checkpoint stays as it was."""
    previous = checked["all_int8"].path
    before = {f.name: f.read_bytes() for f in previous.iterdir()}
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    linear = [o.name for o in inventory if o.type == "Linear"]
    bad = {
        "match no module": ["lm_head", "model.language_model.layers.0.self_attn.qkv_proj"],
        "shares its weight": [],  # lm_head, tied to the embedding, would be quantized
        "leaves no Linear": linear,
    }
    for message, ignore in bad.items():
        with pytest.raises(InputError, match=message):
            write_checkpoint(small_model_dir, ignore, previous)
    assert {f.name: f.read_bytes() for f in previous.iterdir()} == before
    assert not [p for p in previous.parent.iterdir() if TMP_TAG in p.name]


def test_the_language_tower_as_qwen2_computes_the_vl_checkpoints_text_logits_to_the_bit(checked, tmp_path):
    """What vLLM is given (op_sensitivity.quantize.vllm_text): the W8A8 tensors as stored under
    Qwen2's names; on text alone the Qwen2.5-VL decoder is a Qwen2 decoder, so transformers' Qwen2
    on the converted checkpoint computes the VL checkpoint's logits exactly."""
    from transformers import Qwen2ForCausalLM

    from op_sensitivity.quantize import vllm_text as vt

    chosen = checked["chosen"]
    written = vt.text_checkpoint(chosen.path, tmp_path / "text")
    config = json.loads((tmp_path / "text" / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    kept_qkv = [m for m in chosen.keep if ".self_attn." in m]
    assert len(kept_qkv) == 3 and written["dropped"] > 0  # the vision tensors are left out
    text_kept = {m.replace("model.language_model.", "model.") for m in kept_qkv}
    assert text_kept <= set(config["quantization_config"]["ignore"])
    assert not text_kept & set(written["quantized"]) and "model.layers.0.mlp.up_proj" in written["quantized"]
    assert {vt.vllm_module(m) for m in kept_qkv} == {"model.layers.0.self_attn.qkv_proj"}
    text = Qwen2ForCausalLM.from_pretrained(tmp_path / "text", local_files_only=True).eval()
    if hasattr(text, "ct_decompress_hook"):
        text.hf_quantizer.compressor.decompress_model(text)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        vl, qwen2 = chosen.model(input_ids=ids).logits, text(input_ids=ids).logits
    assert torch.equal(vl, qwen2)
    full = load_checkpoint(checked["all_int8"].path)  # a list that quantizes q/k/v computes otherwise
    with torch.no_grad():
        assert not torch.equal(full(input_ids=ids).logits, qwen2)


def test_caption_logprobs_without_the_image_give_the_measurers_nll(small_model_dir, test_dir):
    """The image and its markers are dropped, the caption kept; its log-probabilities are the
    ones the project's NLL averages (what vLLM's prompt_logprobs are compared with)."""
    from op_sensitivity.data.calibration import load_calibration
    from op_sensitivity.model.batches import build_eval_batches
    from op_sensitivity.model.source import load_model_dir
    from op_sensitivity.quantize import vllm_text as vt
    from op_sensitivity.validation.metrics import Totals, reference

    model, processor, _ = load_model_dir(small_model_dir)
    image = vt.image_tokens(model.config)
    meta, records = load_calibration(test_dir, TEST)
    (batch, mask), *_ = build_eval_batches(records[:2], test_dir, processor, meta.mode, 2)
    split = vt.text_split([(batch, mask)], image)
    assert len(split) == 2 and set(batch["input_ids"][0].tolist()) & image
    one, kept = split[0]
    ids = one["input_ids"][0].tolist()
    assert not set(ids) & image and kept.sum() > 0
    assert one["input_ids"][0][kept[0]].tolist() == batch["input_ids"][0][mask[0]].tolist()
    with torch.no_grad():
        logits = model(**one).logits
    logprobs = vt.caption_logprobs(logits[0], ids, kept[0].tolist())
    totals = Totals()
    totals.add(reference(logits, one["input_ids"], kept, one["attention_mask"]), logits)
    assert -sum(logprobs) / len(logprobs) == pytest.approx(totals.values()["nll"], rel=1e-6)


def test_a_missing_vllm_environment_names_the_command_that_builds_it(monkeypatch, tmp_path):
    from op_sensitivity.quantize import vllm_text as vt

    monkeypatch.setenv("OP_SENSITIVITY_VLLM_PYTHON", str(tmp_path / "none" / "python"))
    with pytest.raises(InputError, match=r"not found \(build it with `make vllm-env`\)"):
        vt.serve(tmp_path, [[1, 2]])


def test_vllms_reciprocal_rounding_differs_from_qdq_only_at_ties_that_bf16_inputs_hit():
    """vLLM's per-token quantizer multiplies by 1 / scale, compressed-tensors' QDQ divides. The two
    give other codes only where the exact quotient 127 x / amax is k + 0.5: a tie that each float32
    evaluation misses by an ulp, one on each side.
    Inputs made from bfloat16 values (a normalized bf16 embedding row, as at the 3B size) hit such
    ties; float32 Gaussian inputs of the same shape hit none."""
    from op_sensitivity.quantize.vllm_text import _per_token_int8

    g = torch.Generator().manual_seed(0)
    bf16_rows = torch.randn(64, 2048, generator=g).bfloat16().float() * 1.37
    fp32_rows = torch.randn(64, 2048, generator=g)
    counts = []
    for x in (bf16_rows, fp32_rows):
        (qdq,) = _per_token_int8(127.0)(None, (x,))
        (vllm,) = _per_token_int8(127.0, reciprocal=True)(None, (x,))
        scale = x.abs().amax(-1, keepdim=True) / 127.0
        differ = qdq != vllm
        exact = (x.double() * 127 / x.double().abs().amax(-1, keepdim=True))[differ]
        assert torch.equal(exact - exact.floor(), torch.full_like(exact, 0.5))
        step = (vllm[differ] - qdq[differ]).abs() / scale.expand_as(x)[differ]
        torch.testing.assert_close(step, torch.ones_like(step), rtol=1e-5, atol=0)  # one code apart
        counts.append(int(differ.sum()))
    assert counts[0] > 10 and counts[1] == 0, counts


def test_the_ulp_jitter_moves_every_input_by_one_ulp_the_same_way_per_seed():
    from op_sensitivity.quantize.vllm_text import _ulp_jitter

    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    (a,) = _ulp_jitter(7)(None, (x,))
    (b,) = _ulp_jitter(7)(None, (x,))
    (c,) = _ulp_jitter(8)(None, (x,))
    assert torch.equal(a, b) and not torch.equal(a, c)
    up, down = torch.nextafter(x, x + 1), torch.nextafter(x, x - 1)
    assert bool(((a == up) | (a == down)).all()) and 0.3 < float((a == up).float().mean()) < 0.7
