"""The library-made reference spectra (ModelOpt, compressed-tensors) on the small model: sane
values, the identities the trial definitions imply, and the libraries' own quantizer state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from op_sensitivity.data.calibration import load_calibration
from op_sensitivity.inventory import read_inventory
from op_sensitivity.model.batches import build_batches
from op_sensitivity.model.source import load_model_dir
from tests.schemes.library_spectra import (
    Spectrum,
    compressed_tensors_spectrum,
    modelopt_enabled,
    modelopt_spectrum,
    module_output,
    sse,
)
from tests.threads import torch_threads

CONV = "model.visual.patch_embed.proj"
PAIR = ["model.language_model.layers.0.self_attn.q_proj", "lm_head"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The module's values on one torch thread (as under xdist), the count given back after it."""
    with torch_threads(1):
        yield


@pytest.fixture
def small(calibration_dir: Path, small_model_dir: Path) -> tuple[nn.Module, dict, list[str]]:
    """A fresh fp32 model, the first calibration record as a batch, the Linear ops in module order.

    Built from the loaders load_inputs uses (same model and batch as batch_size=1), without its
    engine-params and scheme checks, which these library references do not depend on.
    """
    meta, records = load_calibration(calibration_dir)
    model, processor, _ = load_model_dir(small_model_dir)
    batch = build_batches(records[:1], calibration_dir, processor, meta.mode, 1)[0]
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    assert inventory[-1].name == "lm_head"
    return model.eval(), batch, [op.name for op in inventory if op.type == "Linear"]


def run(kind: str, model: nn.Module, batch: dict, scored: list[str]) -> Spectrum:
    if kind == "compressed-tensors":
        return compressed_tensors_spectrum(model, batch, scored, "lm_head")
    return modelopt_spectrum(model, batch, scored, "lm_head", kind)


def check_spectrum(spectrum: Spectrum, scored: list[str]) -> None:
    """What holds for any spectrum: keys, finite non-negative values, the trial identities."""
    assert list(spectrum["fallback"]) == scored and list(spectrum["requant"]) == scored
    values = [spectrum["all_int8"], *spectrum["fallback"].values(), *spectrum["requant"].values()]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert spectrum["all_int8"] > 0
    # the last cumulative step has every scored module on, like all_int8
    assert spectrum["requant"][scored[-1]] == pytest.approx(spectrum["all_int8"], rel=1e-6)
    # all but the last on, reached two ways
    assert spectrum["fallback"][scored[-1]] == pytest.approx(spectrum["requant"][scored[-2]], rel=1e-6)


def check_bypass(model: nn.Module, batch: dict, ref: torch.Tensor, off) -> None:
    """With every scored module switched off the library's model is the fp32 model, bit for bit."""
    off()
    assert sse(module_output(model, batch, "lm_head"), ref) == 0.0


@pytest.mark.parametrize("kind", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG", "compressed-tensors"])
def test_full_spectrum(small, kind):
    model, batch, linears = small
    # ModelOpt also quantizes Conv3d; compressed-tensors only nn.Linear (Embedding).
    scored = linears if kind == "compressed-tensors" else [CONV, *linears]
    spectrum = run(kind, model, batch, scored)
    check_spectrum(spectrum, scored)
    fallback = spectrum["fallback"]
    assert len(set(fallback.values())) > len(scored) // 2, "fallback hardly depends on the op"
    # lm_head is measured directly: keeping it fp32 removes its own error from the measured output
    assert fallback["lm_head"] < spectrum["all_int8"]
    # under the stock deny globs (*visual*, *lm_head*), yet really quantized
    assert fallback["model.visual.merger.mlp.0"] != spectrum["all_int8"]


def test_modelopt_only_scored_quantizers(small):
    model, batch, _ = small
    ref = module_output(model, batch, "lm_head")
    spectrum = modelopt_spectrum(model, batch, PAIR, "lm_head", "INT8_DEFAULT_CFG")
    check_spectrum(spectrum, PAIR)
    assert modelopt_enabled(model) == set(PAIR)  # every other TensorQuantizer is off
    head = model.get_submodule("lm_head")
    # INT8_DEFAULT_CFG: per-output-channel weight amax (axis 0) = max |w| per row, per-tensor input
    assert torch.equal(head.weight_quantizer.amax.flatten(), head.weight.abs().amax(dim=1))
    assert head.input_quantizer.amax.numel() == 1
    k_proj = model.get_submodule("model.language_model.layers.0.self_attn.k_proj")
    assert not (k_proj.weight_quantizer.is_enabled or k_proj.input_quantizer.is_enabled)

    def off() -> None:
        for name in PAIR:
            model.get_submodule(name).weight_quantizer.disable()
            model.get_submodule(name).input_quantizer.disable()

    check_bypass(model, batch, ref, off)


def test_compressed_tensors_only_scored_modules(small):
    from compressed_tensors.quantization import QuantizationStatus, disable_quantization
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    model, batch, linears = small
    ref = module_output(model, batch, "lm_head")
    spectrum = compressed_tensors_spectrum(model, batch, PAIR, "lm_head")
    check_spectrum(spectrum, PAIR)
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    assert quantized == set(PAIR)
    head = model.get_submodule("lm_head")
    assert head.quantization_status == QuantizationStatus.FROZEN
    # W8A8 weights: symmetric per output channel, calculate_qparams' max|w| / (255 / 2); an
    # all-zero row (the padding token's, tied embedding) gets fp32 eps instead of a zero scale
    expected = head.weight.abs().amax(dim=1, keepdim=True) / 127.5
    expected = torch.where(expected == 0, torch.finfo(torch.float32).eps, expected)
    assert torch.allclose(head.weight_scale, expected) and not head.weight_zero_point.any()
    # the per-token quirk: a 2-D [tokens, hidden] activation gets a single (per-tensor) scale
    args = head.quantization_scheme.input_activations
    assert compute_dynamic_scales_and_zp(torch.randn(5, 32), args, head)[0].shape == (1,)
    assert compute_dynamic_scales_and_zp(torch.randn(1, 5, 32), args, head)[0].shape == (1, 5, 1)
    with pytest.raises(ValueError, match="nn.Linear only"):
        compressed_tensors_spectrum(model, batch, [CONV], "lm_head")

    check_bypass(model, batch, ref, lambda: [disable_quantization(model.get_submodule(n)) for n in PAIR])
