"""Reference per-op sensitivity spectra computed with the libraries' own quantized models.

Our engine re-implements each library's numerics; these functions let the libraries quantize a
model themselves (ModelOpt's ``mtq.quantize``, compressed-tensors' config + lifecycle) and measure
the same three trial kinds, so the re-implementation can be checked against the real thing:

- ``all_int8``: every scored module quantized;
- ``fallback[name]``: every scored module quantized except ``name``;
- ``requant[name]``: cumulative, scored modules enabled one after another in the given order
  (never reverted), the value right after enabling ``name``.

A trial's value is the summed squared error of module ``measured_at``'s output against the
unquantized model's output, on one forward of ``batch``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

Spectrum = dict  # {"fallback": {module_name: float}, "requant": {module_name: float}, "all_int8": float}
Toggle = Callable[[str, bool], None]  # (scored module name, quantized?) -> None

MODELOPT_CONFIGS = ("INT8_DEFAULT_CFG", "FP8_DEFAULT_CFG")


def module_output(model: nn.Module, batch: dict[str, torch.Tensor], measured_at: str) -> torch.Tensor:
    """Output of ``measured_at`` for ``model(**batch)``, caught by a forward hook (fp32 copy)."""
    caught: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, out: torch.Tensor | tuple) -> None:
        caught.append((out[0] if isinstance(out, tuple) else out).detach().float().clone())

    handle = model.get_submodule(measured_at).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise RuntimeError(f"{measured_at} ran {len(caught)} times in one forward, expected once")
    return caught[0]


def sse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out.float() - ref.float()) ** 2).sum())


def measure_spectrum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    scored: list[str],
    measured_at: str,
    ref: torch.Tensor,
    toggle: Toggle,
) -> Spectrum:
    """The three trial kinds, driven only through the library's own per-module switch ``toggle``."""

    def trial() -> float:
        return sse(module_output(model, batch, measured_at), ref)

    for name in scored:
        toggle(name, True)
    all_int8 = trial()
    fallback = {}
    for name in scored:
        toggle(name, False)
        fallback[name] = trial()
        toggle(name, True)
    for name in scored:
        toggle(name, False)
    requant = {}
    for name in scored:
        toggle(name, True)
        requant[name] = trial()
    return {"fallback": fallback, "requant": requant, "all_int8": all_int8}


# --- ModelOpt -------------------------------------------------------------------------------


def modelopt_config(cfg_name: str, scored: list[str]) -> dict:
    """The stock config (deep copy), then: every quantizer off, only scored weight/input ones on.

    ``set_quantizer_by_cfg`` applies entries in order, later ones winning. The stock
    ``*weight_quantizer`` / ``*input_quantizer`` entries carry a full ``cfg`` (num_bits, axis) and
    so set every quantizer's attributes; the appended entries carry only ``enable`` and toggle
    without touching those attributes. That is how a scored module under a stock deny glob
    (``*lm_head*``, ``*visual*``, parent class ``nn.Embedding``...) still gets the stock numerics.
    Output and attention (bmm / kv) quantizers stay off: the trailing ``*`` deny covers them.
    """
    import modelopt.torch.quantization as mtq

    if cfg_name not in MODELOPT_CONFIGS:
        raise ValueError(f"cfg_name: expected one of {MODELOPT_CONFIGS}, got {cfg_name!r}")
    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    cfg["quant_cfg"].append({"quantizer_name": "*", "enable": False})
    for name in scored:
        for quantizer in ("weight_quantizer", "input_quantizer"):
            cfg["quant_cfg"].append({"quantizer_name": f"{name}.{quantizer}", "enable": True})
    return cfg


def modelopt_quantizers(model: nn.Module, name: str) -> list[nn.Module]:
    """ModelOpt puts ``weight_quantizer`` and ``input_quantizer`` (TensorQuantizer) as children of
    the converted module itself (``<name>.weight_quantizer``), next to ``output_quantizer``."""
    module = model.get_submodule(name)
    return [module.weight_quantizer, module.input_quantizer]


def modelopt_enabled(model: nn.Module) -> set[str]:
    """Names of the modules with an enabled TensorQuantizer of any kind (weight, input, output, bmm)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {
        qname.rpartition(".")[0]
        for qname, q in model.named_modules()
        if isinstance(q, TensorQuantizer) and q.is_enabled
    }


def modelopt_spectrum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    scored: list[str],
    measured_at: str,
    cfg_name: str,
) -> Spectrum:
    """ModelOpt's own fake quantization (``mtq.quantize``, "max" calibration) on CPU.

    The reference output is the untouched fp32 model's, taken before conversion. Calibration runs
    ``model(**batch)`` once with quantizers in calibration mode (quantization off), so the amax
    values are maxima over the fp32 forward. A trial toggles a module's two quantizers with
    ``TensorQuantizer.disable()`` / ``.enable()``; the calibrated amax stays in place meanwhile.
    """
    import modelopt.torch.quantization as mtq

    ref = module_output(model, batch, measured_at)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            m(**batch)

    model = mtq.quantize(model, modelopt_config(cfg_name, scored), forward_loop)
    if modelopt_enabled(model) != set(scored):
        raise RuntimeError(f"ModelOpt quantizers on {sorted(modelopt_enabled(model))}, expected {scored}")

    def toggle(name: str, on: bool) -> None:
        for quantizer in modelopt_quantizers(model, name):
            quantizer.enable() if on else quantizer.disable()

    return measure_spectrum(model, batch, scored, measured_at, ref, toggle)


# --- compressed-tensors ---------------------------------------------------------------------


def ct_apply_w8a8(model: nn.Module, scored: list[str]) -> None:
    """compressed-tensors' ``W8A8`` preset on exactly the scored modules, with its own lifecycle.

    Targets are the exact module names (a non-``re:`` target matches a name exactly, or a class
    name), so nothing else gets a ``quantization_scheme``. ``apply_quantization_config`` attaches
    the scheme, empty ``weight_scale`` / ``weight_zero_point`` parameters and the QDQ forward
    (``set_forward_quantized``); it only handles ``nn.Linear`` / ``nn.Embedding`` (and attention
    for kv schemes) and silently skips anything else, hence the explicit check. Inputs are dynamic
    (scales computed per forward), so only weights need calibration.
    """
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    odd = [n for n in scored if not isinstance(model.get_submodule(n), nn.Linear)]
    if odd:
        raise ValueError(f"compressed-tensors W8A8 quantizes nn.Linear only, got {odd}")
    scheme = preset_name_to_scheme("W8A8", list(scored))
    config = QuantizationConfig(config_groups={"group_0": scheme})
    apply_quantization_config(model, config, show_progress=False)
    for name in scored:
        module = model.get_submodule(name)
        ct_calibrate_weight(module)
        module.quantization_status = QuantizationStatus.FROZEN


def ct_calibrate_weight(module: nn.Module) -> None:
    """Static weight qparams as llm-compressor's default min-max observer gives them.

    llm-compressor (not installable here) owns the observers; for a ``channel`` strategy its
    MinMaxObserver reduces the weight to one min and max per output row, then calls
    compressed-tensors' ``calculate_qparams`` (symmetric: ``max|w| / 127.5``, zero point 0), and
    writes the result with ``update_offload_parameter``. We do the same with the same calls.
    """
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = module.weight.detach()
    mins = weight.amin(dim=-1, keepdim=True)
    maxs = weight.amax(dim=-1, keepdim=True)
    scale, zero_point = calculate_qparams(mins, maxs, module.quantization_scheme.weights)
    update_offload_parameter(module, "weight_scale", scale)
    update_offload_parameter(module, "weight_zero_point", zero_point)


def compressed_tensors_spectrum(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    scored: list[str],
    measured_at: str,
) -> Spectrum:
    """compressed-tensors' own QDQ forward (W8A8: int8 per-channel weights, int8 per-token
    dynamic inputs), toggled per module with its ``enable_quantization`` /
    ``disable_quantization`` (the ``quantization_enabled`` flag the patched forward reads).

    Quirk: the ``token`` strategy keeps dims 0 and 1 and reduces the rest, so a 2-D activation
    ([tokens, hidden], the vision tower's layout) has nothing to reduce and falls back to one
    per-tensor scale; only 3-D [batch, seq, hidden] inputs get true per-token scales.
    """
    from compressed_tensors.quantization import disable_quantization, enable_quantization

    ref = module_output(model, batch, measured_at)
    ct_apply_w8a8(model, scored)

    def toggle(name: str, on: bool) -> None:
        module = model.get_submodule(name)
        enable_quantization(module) if on else disable_quantization(module)

    return measure_spectrum(model, batch, scored, measured_at, ref, toggle)
