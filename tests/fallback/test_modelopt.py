"""The ModelOpt export against nvidia-modelopt 0.47 itself: merged into a copy of the stock INT8
config, ``mtq.quantize`` (CPU, fake quant) disables exactly the kept modules' quantizers."""

import copy
from dataclasses import replace
from fnmatch import fnmatchcase

import pytest
import torch

from op_sensitivity.fallback.exports import (
    MODELOPT_STOCK_DISABLED_CLASSES,
    MODELOPT_STOCK_DISABLED_NAMES,
    modelopt_quant_cfg,
)

TEXT_UP = "model.language_model.layers.1.mlp.up_proj"  # layers.11.mlp.up_proj shares its prefix
VISION = "model.visual.merger.mlp.0"
KEEP = ["lm_head", TEXT_UP, VISION]
QUANTIZERS = ("weight_quantizer", "input_quantizer", "output_quantizer")


def _hits(patterns, name):
    return any(fnmatchcase(name, p) for p in patterns)


def test_patterns_stop_at_the_module_boundary():
    doc = modelopt_quant_cfg(["lm_head", TEXT_UP, "odd[0]"])
    assert doc["quant_cfg"] == [
        {"quantizer_name": "lm_head.*", "enable": False},
        {"quantizer_name": TEXT_UP + ".*", "enable": False},
        {"quantizer_name": "odd[[]0].*", "enable": False},  # glob characters taken literally
    ]
    pats = [e["quantizer_name"] for e in doc["quant_cfg"]]
    for m in ("lm_head", TEXT_UP, "odd[0]"):
        assert all(_hits(pats, f"{m}.{q}") for q in QUANTIZERS)
    for neighbour in (
        "lm_head_extra",
        "model.lm_head",
        "model.language_model.layers.11.mlp.up_proj",
        TEXT_UP + "_extra",
        "odd0",
    ):
        assert not _hits(pats, f"{neighbour}.weight_quantizer"), neighbour
    assert doc["stock_config_disables"]["kept_modules"] == ["lm_head"]
    assert modelopt_quant_cfg([])["quant_cfg"] == []


@pytest.fixture(scope="module")
def mtq():
    return pytest.importorskip(
        "modelopt.torch.quantization",
        reason="nvidia-modelopt is not installed (pip install -e '.[modelopt]')",
    )


@pytest.fixture(scope="module")
def twelve_layer_dir(small_model_params, tmp_path_factory):
    """The small model with 12 decoder layers, so that layers.1 has a neighbour layers.11."""
    from op_sensitivity.model.source import materialize_model

    tiny = small_model_params.tiny
    params = replace(small_model_params, tiny=replace(tiny, text={**tiny.text, "num_hidden_layers": 12}))
    out = tmp_path_factory.mktemp("modelopt") / "qwen2_5_vl"
    materialize_model(params, out)
    return out


def _quantized(mtq, model_dir, calibration_dir, extra_entries):
    """Load the model, quantize it with stock INT8 + ``extra_entries``; return it and its Linear names."""
    from op_sensitivity.data.calibration import load_calibration
    from op_sensitivity.model.batches import build_batches
    from op_sensitivity.model.source import load_model_dir

    model, processor, _ = load_model_dir(model_dir)
    _, records = load_calibration(calibration_dir)
    batches = build_batches(records[:1], calibration_dir, processor, "image_caption", 1)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def forward_loop(m):
        with torch.no_grad():
            for b in batches:
                m(**b)

    cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    cfg["quant_cfg"] = [*cfg["quant_cfg"], *extra_entries]  # the README's merge
    return mtq.quantize(model, cfg, forward_loop), linears


def _states(model):
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m.is_enabled for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def test_modelopt_047_quantize_honours_the_export(mtq, twelve_layer_dir, calibration_dir):
    # The stock list is what the export says it is.
    stock = mtq.INT8_DEFAULT_CFG["quant_cfg"]
    assert isinstance(stock, list)  # the old dict fragment's `.update` has nothing to merge into
    assert stock[:3] == [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": 0}},
        {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
    ]
    by_name = [e["quantizer_name"] for e in stock[3:] if "parent_class" not in e]
    by_class = [e["parent_class"] for e in stock[3:] if "parent_class" in e]
    assert all(e["enable"] is False and "cfg" not in e for e in stock[3:])
    assert by_name == list(MODELOPT_STOCK_DISABLED_NAMES)
    assert by_class == list(MODELOPT_STOCK_DISABLED_CLASSES)

    doc = modelopt_quant_cfg(KEEP)
    assert doc["stock_config_disables"]["kept_modules"] == ["lm_head", VISION]
    model, linears = _quantized(mtq, twelve_layer_dir, calibration_dir, doc["quant_cfg"])
    baseline, _ = _quantized(mtq, twelve_layer_dir, calibration_dir, [])
    on, stock_on = _states(model), _states(baseline)

    # Kept modules: every quantizer off.
    for m in KEEP:
        assert [on[f"{m}.{q}"] for q in QUANTIZERS] == [False, False, False], m
    # The export changes exactly the kept modules' quantizers that stock left on: the text one's.
    changed = {q for q in on if on[q] != stock_on[q]}
    assert changed == {f"{TEXT_UP}.weight_quantizer", f"{TEXT_UP}.input_quantizer"}
    # Every other Linear stays quantized unless stock disables it, and the export names those.
    off_by_stock = {n for n in linears if n not in KEEP and not on[f"{n}.weight_quantizer"]}
    named = {
        n
        for n in linears
        if _hits(doc["stock_config_disables"]["quantizer_name_patterns"], f"{n}.weight_quantizer")
    }
    assert off_by_stock == named - set(KEEP)
    assert off_by_stock == {n for n in linears if n.startswith("model.visual.")} - {VISION}
    for n in set(linears) - set(KEEP) - off_by_stock:
        assert on[f"{n}.weight_quantizer"] and on[f"{n}.input_quantizer"], n
    assert on["model.language_model.layers.11.mlp.up_proj.weight_quantizer"]
    assert len(linears) - len(KEEP) - len(off_by_stock) == 12 * 7 - 1  # 7 per layer, less the kept one
    # Calibration ran through the enabled ones (max: amax recorded) and skipped the kept one.
    qmodules = dict(model.named_modules())
    assert qmodules["model.language_model.layers.11.mlp.up_proj.input_quantizer"].amax is not None
    assert qmodules[f"{TEXT_UP}.input_quantizer"].amax is None
