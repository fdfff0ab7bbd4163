"""Our pass under each scheme against the library's own quantized model, trial for trial.

The library side is tests/schemes/library_spectra.py (ModelOpt ``mtq.quantize``, compressed-tensors'
W8A8 lifecycle) and tests/schemes/ort_spectrum.py (ONNX Runtime ``quantize_static`` on a
``torch.onnx`` export). The same trials (one calibration batch, the error at the logits) must give
the same values: bit for bit where the library computes in PyTorch, to ONNX Runtime's own int8
kernels' rounding otherwise. docs/benchmarks.md has the same on two configs (benchmarks/schemes.py).
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch

from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.contract import VISION_FP32
from op_sensitivity.engines.runner import load_inputs, run_engine
from op_sensitivity.phases import FALLBACK, REQUANT
from tests.helpers import ORT_NEEDS_VNNI, sensitivity_params
from tests.schemes.library_spectra import compressed_tensors_spectrum, modelopt_spectrum
from tests.schemes.ort_spectrum import ort_spectrum
from tests.threads import torch_threads

pytestmark = pytest.mark.xdist_group("schemes_agreement")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The module's values on one torch thread (as under xdist), the count given back after it."""
    with torch_threads(1):
        yield


def ours(calibration_dir, model_dir, scheme, tmp_path, arithmetic="auto", **kw):
    params = sensitivity_params(engine="native", **kw)
    params = replace(params, native=replace(params.native, scheme=scheme, arithmetic=arithmetic))
    inventory = model_dir.parent / "op_inventory.json"
    model, spec, inv, meta = load_inputs(params, calibration_dir, model_dir, inventory)
    report = build_report(
        run_engine("native", model, spec, tmp_path / f"ws_{scheme}_{arithmetic}"), inv, meta
    )
    values = {p: {o["module"]: o["mse"] for o in report["phases"][p]["ops"]} for p in (FALLBACK, REQUANT)}
    fresh, _, _, _ = load_inputs(params, calibration_dir, model_dir, inventory)
    return values, report["metadata"]["all_int8_mse"], fresh, spec.batches[0]


@pytest.mark.parametrize("cfg", ["INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
def test_modelopt_schemes_equal_modelopts_own_model_bit_for_bit(
    cfg, calibration_dir, small_model_dir, tmp_path
):
    scheme = "modelopt_int8" if cfg.startswith("INT8") else "modelopt_fp8"
    values, all_int8, model, batch = ours(calibration_dir, small_model_dir, scheme, tmp_path)
    scored = list(values[FALLBACK])
    assert scored and not any(".visual." in m for m in scored) and "lm_head" not in scored  # its stock skips
    lib = modelopt_spectrum(model, batch, scored, "lm_head", cfg)
    assert values[FALLBACK] == lib["fallback"]
    assert values[REQUANT] == lib["requant"]
    assert all_int8 == lib["all_int8"]


def test_compressed_tensors_equals_its_own_model_on_3d_activations(
    calibration_dir, small_model_dir, tmp_path
):
    """The text tower's activations are [batch, tokens, hidden]: one scale per token on both sides."""
    values, all_int8, model, batch = ours(
        calibration_dir, small_model_dir, "llmcompressor_w8a8", tmp_path, op_name_dict=VISION_FP32
    )
    lib = compressed_tensors_spectrum(model, batch, list(values[FALLBACK]), "lm_head")
    assert values[FALLBACK] == lib["fallback"] and values[REQUANT] == lib["requant"]
    assert all_int8 == lib["all_int8"]


def test_compressed_tensors_gap_is_the_2d_vision_activations(calibration_dir, small_model_dir, tmp_path):
    """On a 2-D activation compressed-tensors' TOKEN strategy keeps one scale for the whole tensor;
    vLLM's per-token kernel (and we) keep one per row. Only trials that quantize a vision op differ."""
    values, all_int8, model, batch = ours(calibration_dir, small_model_dir, "llmcompressor_w8a8", tmp_path)
    lib = compressed_tensors_spectrum(model, batch, list(values[FALLBACK]), "lm_head")
    assert all_int8 != lib["all_int8"]
    scored = list(values[REQUANT])
    first_vision = next(i for i, m in enumerate(scored) if ".visual." in m)
    assert first_vision == 0  # the vision tower runs first
    # compressed-tensors' per-tensor scale on 2-D activations is coarser: more damage there
    vision = [m for m in scored if ".visual." in m]
    assert lib["requant"][vision[-1]] > values[REQUANT][vision[-1]]


@ORT_NEEDS_VNNI
def test_ort_scheme_agrees_with_onnx_runtime_quantize_static(calibration_dir, small_model_dir, tmp_path):
    values, all_int8, model, batch = ours(calibration_dir, small_model_dir, "ort_qdq", tmp_path)
    scored = list(values[FALLBACK])
    assert "model.visual.patch_embed.proj" in scored and "lm_head" in scored
    lib = ort_spectrum(model, batch, scored, "lm_head", tmp_path / "ort")
    assert abs(all_int8 - lib["all_int8"]) / lib["all_int8"] < 1e-4
    for phase in (FALLBACK, REQUANT):
        a, b = pd.Series(values[phase]), pd.Series(lib[phase])[list(values[phase])]
        if phase == REQUANT:  # the per-op increments of the cumulative curve
            a, b = a.diff().fillna(a.iloc[0]), b.diff().fillna(b.iloc[0])
        assert a.corr(b, method="spearman") >= 0.95, phase
        assert ((a - b).abs() / b.abs()).median() < 1e-3, phase


@pytest.mark.parametrize(
    ("scheme", "arithmetic"), [("modelopt_int8", "int8_kernels"), ("modelopt_fp8", "fp8_kernels")]
)
def test_kernels_agree_with_fake_quant(
    scheme, arithmetic, calibration_dir, small_model_dir, tmp_path, monkeypatch
):
    """torch._int_mm (exact int32 sums) and torch._scaled_mm against the float fake-quant: the
    accumulation order and one rescale per output are all that differ.

    Which arithmetic ran is proven by the kernel calls themselves (counted around the real
    kernel), not by a rounding difference: on some CPUs (AMD EPYC) _scaled_mm's values equal
    fake-quant's to the bit."""
    kernel = {"int8_kernels": "_int_mm", "fp8_kernels": "_scaled_mm"}[arithmetic]
    real, calls = getattr(torch, kernel), []

    def counted(*args, **kwargs):
        calls.append(kernel)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, kernel, counted)
    fq, fq_all, _, _ = ours(calibration_dir, small_model_dir, scheme, tmp_path)
    assert calls == []  # fake-quant never calls the kernel
    kern, kern_all, _, _ = ours(calibration_dir, small_model_dir, scheme, tmp_path, arithmetic=arithmetic)
    assert len(calls) > len(kern[FALLBACK])  # the kernel ran: at least once per trial
    assert abs(kern_all - fq_all) / fq_all < 1e-5
    for phase in (FALLBACK, REQUANT):
        for m, v in fq[phase].items():
            assert abs(kern[phase][m] - v) / v < 1e-4, (phase, m)
