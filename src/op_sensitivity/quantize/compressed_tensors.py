"""A compressed-tensors W8A8 checkpoint of a keep-list, and the model transformers loads from it.

Why: the native engine *predicts* what a keep-list costs under ``llmcompressor_w8a8``; this writes
the checkpoint llm-compressor would write (compressed-tensors' ``W8A8`` preset on every Linear,
the list as ``ignore``, ``int-quantized`` format) so that the prediction can be checked in the
runtime that loads it.

llm-compressor cannot be installed beside this project (see ``schemes.compressed_tensors``), so
its steps are done with compressed-tensors' own calls: ``apply_quantization_config`` (scheme,
empty qparams, QDQ forward), the weight scales by the min-max rule llm-compressor's default
observer applies (per-row min and max handed to ``calculate_qparams``: symmetric
``max|w| / 127.5``, zero point 0; compressed-tensors 0.20 ships no observer of its own),
``ModelCompressor`` in ``int-quantized`` format (int8 codes and ``weight_scale``; the symmetric
zero points are dropped), ``save_pretrained`` then ``update_config`` (``quantization_config`` in
``config.json``), as llm-compressor's ``save_pretrained`` wrapper does.

What transformers 5 runs for such a checkpoint on CPU (:func:`runtime`), with its default
``dequantize=False``: ``CompressedTensorsHfQuantizer`` applies the config to the empty model
(every matched Linear gets compressed-tensors' QDQ forward), loads the int8 codes and scales as
stored, and decompresses every quantized Linear before the first forward (codes x scale, in the
model's dtype; :func:`load_checkpoint` does it at once). Each call then quantizes its input
dynamically (int8, symmetric, one scale per token) and dequantizes it at once: W8A8 rounding of
weights and activations, the matmul in float (no int8 kernel on CPU). ``dequantize=True`` would
skip the activation quantization (W8A16). One difference from the native scheme: compressed-
tensors' token strategy keeps dims 0 and 1 of the input, so a 2-D input (the vision tower's
``[patches of every image, hidden]``) gets one scale for the whole tensor, where vLLM's kernel and
the native engine keep one per row. And a bf16 model's scales are stored in bf16 and its codes
computed in bf16 arithmetic (compressed-tensors' ``quantize`` does not upcast), as llm-compressor
writes them: on a 68 M-parameter bf16 model 7.8% of one weight's codes differ by one from the
float32 codes the native engine predicts with.

Memory: the writer holds the model as stored (a bf16 checkpoint stays bf16, never a float32
copy); scales and codes are computed module by module in the stored dtype, each weight replaced by
its int8 codes in place, then ``save_pretrained`` serializes. On the 68 M-parameter bf16 model
(129 MB of weights) the peak was 280 MB above the imports: the mapped bf16 weights, the codes and
the serialized file.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

from ..atomic import atomic_dir
from ..errors import InputError
from ..model.source import load_model_dir
from ..params import TARGET_SCHEMES
from .base import Inputs, Runtime, Target, dir_bytes
from .causes import Cause
from .hf_checkpoint import copy_processor, linear_modules, logits_of, meta_model, rename_to_modules

PRESET = "W8A8"
TARGETS = ["Linear"]
FORMAT = "int-quantized"
EXTRA = "pip install -e '.[ct]'"


def w8a8_config(ignore: list[str]) -> Any:
    """The ``QuantizationConfig`` llm-compressor's ``QuantizationModifier(targets=["Linear"],
    scheme="W8A8", ignore=ignore)`` builds (``fallback.exports.llmcompressor_recipe``)."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    scheme = preset_name_to_scheme(PRESET, list(TARGETS))
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore))


def _check_ignore(model: nn.Module, ignore: list[str], model_dir: Path) -> None:
    """Every entry names some module: compressed-tensors only warns, and a typo would quietly
    quantize an op the list keeps."""
    from compressed_tensors.utils.match import is_match

    modules = list(model.named_modules())
    unmatched = [i for i in ignore if not any(is_match(n, m, i) for n, m in modules)]
    if unmatched:
        raise InputError(
            f"ignore: {unmatched[:5]} match no module of {model_dir} (names as in op_inventory.json, "
            "or 're:<regex>')"
        )


def _check_untied(model: nn.Module, quantized: list[str]) -> None:
    """A quantized weight shared with another module (a tied ``lm_head``) would be saved as int8
    beside the float embedding it is tied to; the scheme skips ``lm_head``, so ignore it."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(name)
    for name in quantized:
        shared = owners[id(model.get_submodule(name).weight)]
        if len(shared) > 1:
            raise InputError(
                f"ignore: {name} shares its weight with {[s for s in shared if s != name]} "
                "(tie_word_embeddings); add it to ignore (llmcompressor_w8a8 skips lm_head)"
            )


def _calibrate_weight(module: nn.Module) -> None:
    """Static per-channel weight qparams as llm-compressor's default min-max observer gives them:
    per-row min and max (in the stored dtype) handed to compressed-tensors' ``calculate_qparams``."""
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.utils import calculate_qparams

    weight = module.weight.detach()
    scale, zero_point = calculate_qparams(
        weight.amin(dim=-1, keepdim=True),
        weight.amax(dim=-1, keepdim=True),
        module.quantization_scheme.weights,
    )
    update_offload_parameter(module, "weight_scale", scale)
    update_offload_parameter(module, "weight_zero_point", zero_point)
    module.quantization_status = QuantizationStatus.FROZEN


def quantized_modules(model: nn.Module) -> list[str]:
    from compressed_tensors.quantization.utils import is_module_quantized

    return [name for name, m in model.named_modules() if is_module_quantized(m)]


def both_names(checkpoint_names: list[str] | None, module_names: list[str]) -> list[str]:
    """The config's ``ignore``: every unquantized Linear by its checkpoint name and its module name.

    compressed-tensors 0.20 writes the names the weights are saved under (``model.layers.0.mlp.
    up_proj``: ``QuantizationConfig.from_pretrained`` maps them back through transformers' save
    conversion), which vLLM maps to its own modules; transformers 5 matches the list against the
    modules of the model it builds (``model.language_model.layers.0.mlp.up_proj``), so with the
    checkpoint names alone it quantizes every ignored module on load, with ``weight_scale`` left
    uninitialized (the load report's MISSING). A name that is not a module in one runtime matches
    nothing there, so the union is read right by both."""
    names = list(checkpoint_names or [])
    return names + [n for n in module_names if n not in set(names)]


def write_checkpoint(model_dir: Path, ignore: list[str], out_dir: Path) -> dict[str, Any]:
    """Write ``out_dir``: a W8A8 ``int-quantized`` compressed-tensors checkpoint of the model at
    ``model_dir`` (``load_model``'s output) with ``ignore`` left unquantized, loadable by
    transformers and vLLM; all of it or nothing (written aside, renamed into place).

    Returns what was written: ``quantized`` / ``ignored`` (Linear module names, model order),
    ``bytes`` on disk, ``format``, the stored ``dtype`` and the wall ``seconds``.
    """
    CompressedTensors().require()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    start = time.perf_counter()
    model, _, _ = load_model_dir(model_dir)
    _check_ignore(model, ignore, model_dir)
    apply_quantization_config(model, w8a8_config(ignore), show_progress=False)
    quantized = quantized_modules(model)
    if not quantized:
        raise InputError(f"ignore: leaves no Linear of {model_dir} to quantize (nothing to write)")
    _check_untied(model, quantized)
    with torch.no_grad():
        for name in quantized:
            _calibrate_weight(model.get_submodule(name))
    done = set(quantized)
    ignored = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done]
    compressor = ModelCompressor.from_pretrained_model(model, FORMAT)
    compressor.quantization_config.ignore = both_names(compressor.quantization_config.ignore, ignored)
    compressor.compress_model(model)  # module by module: weight -> int8 codes in place
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        copy_processor(model_dir, tmp)
    return {
        "format": FORMAT,
        "preset": PRESET,
        "ignore": list(ignore),
        "quantized": quantized,
        "ignored": ignored,
        "dtype": str(model.dtype).removeprefix("torch."),
        "bytes": dir_bytes(out_dir),
        "seconds": time.perf_counter() - start,
    }


def load_checkpoint(out_dir: Path, dtype: str | torch.dtype = "auto") -> nn.Module:
    """The model transformers loads from ``out_dir`` (CPU; ``dtype`` "auto": as stored), decompressed
    now rather than on its first forward, so what it computes is fixed when it returns
    (:func:`runtime`). ``dtype=torch.float32`` runs a bf16 checkpoint in float32 (codes and
    scales as stored, the arithmetic of the native engine's float32 prediction)."""
    CompressedTensors().require()
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            out_dir, dtype=dtype, local_files_only=True
        ).eval()
    except (OSError, ValueError) as e:
        raise InputError(
            f"{out_dir}: does not load as a compressed-tensors Qwen2.5-VL checkpoint ({e})"
        ) from e
    if hasattr(model, "ct_decompress_hook"):  # what the hook does on the first forward
        model.hf_quantizer.compressor.decompress_model(model)
    return model


def runtime(model: nn.Module) -> dict[str, Any]:
    """What the loaded model computes, read off its modules: checked, not assumed, so that a
    transformers or compressed-tensors release that changes the route fails loudly."""
    from compressed_tensors.quantization import QuantizationStatus

    loader = getattr(model, "hf_quantizer", None)
    if type(loader).__name__ != "CompressedTensorsHfQuantizer":
        raise RuntimeError(
            f"not loaded by transformers' compressed-tensors quantizer ({type(loader).__name__})"
        )
    quantized = quantized_modules(model)
    odd = []
    for name in quantized:
        m = model.get_submodule(name)
        inputs = m.quantization_scheme.input_activations
        qdq_forward = getattr(m.forward, "__wrapped__", None) is not None  # set_forward_quantized
        if not (
            qdq_forward
            and m.quantization_status == QuantizationStatus.DECOMPRESSED
            and m.weight.is_floating_point()
            and inputs is not None
            and inputs.dynamic is True
        ):
            odd.append(name)
    if odd:
        raise RuntimeError(f"not decompressed W8A8 QDQ modules: {odd[:5]}")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {
        "loader": type(loader).__name__,
        "dequantize": bool(loader.quantization_config.dequantize),
        "quantized": quantized,
        "weights": f"int8 codes x weight_scale, decompressed to {dtype} at load",
        "inputs": "int8 symmetric, dynamic, one scale per [dim0, dim1] entry (per token of a 3-D input, "
        "one per tensor of a 2-D one), quantized and dequantized in each call",
        "matmul": f"{dtype} (nn.Linear on the dequantized weight and input)",
        "dtype": dtype,
    }


def kept_in_checkpoint(out_dir: Path) -> set[str]:
    """The Linear modules the checkpoint leaves unquantized, read back from its tensors (an int8
    ``weight`` with its ``weight_scale``) and checked against its ``quantization_config``."""
    CompressedTensors().require()
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import is_match

    try:
        config = AutoConfig.from_pretrained(out_dir, local_files_only=True)
    except (OSError, ValueError) as e:  # no config.json, or one without model_type
        where = out_dir / "config.json"
        raise InputError(f"{where}: not a compressed-tensors checkpoint's config ({e})") from e
    raw = json.loads((out_dir / "config.json").read_text()).get("quantization_config")
    if not raw or raw.get("format") != FORMAT:
        raise InputError(f"{out_dir / 'config.json'}: no {FORMAT} quantization_config")
    qconfig = QuantizationConfig.model_validate(raw)
    model = meta_model(config)
    rename = rename_to_modules(model)
    dtypes: dict[str, str] = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            keys = handle.keys()  # a safe_open handle is not a mapping
            dtypes.update({rename(k): handle.get_slice(k).get_dtype() for k in keys})
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    from_tensors = {n for n in linear if dtypes.get(f"{n}.weight") == "I8" and f"{n}.weight_scale" in dtypes}
    odd = sorted(n for n in linear if (dtypes.get(f"{n}.weight") == "I8") != (f"{n}.weight_scale" in dtypes))
    targets = [t for g in qconfig.config_groups.values() for t in g.targets]
    from_config = {n for n, m in linear.items() if is_match(n, m, targets, qconfig.ignore or [])}
    if odd or from_tensors != from_config:
        raise InputError(
            f"{out_dir}: tensors and quantization_config disagree (int8 weight without scale or the "
            f"reverse: {odd[:5]}; quantized by tensors only: {sorted(from_tensors - from_config)[:5]}; "
            f"by config only: {sorted(from_config - from_tensors)[:5]})"
        )
    return set(linear) - from_tensors


class CompressedTensors(Target):
    """``compressed_tensors``: the W8A8 ``int-quantized`` checkpoint (vLLM, transformers), from the
    ``llmcompressor_w8a8`` keep-list; measured in transformers' compressed-tensors loader."""

    name = "compressed_tensors"
    scheme = TARGET_SCHEMES["compressed_tensors"]
    format = FORMAT
    requires = ("compressed_tensors",)
    extra = EXTRA
    bar = 1e-3  # the floor: float summation order (the stated cause is measured per run)
    runs_stored_dtype = True  # transformers loads the checkpoint as stored ("auto")
    gap = (
        "transformers' compressed-tensors forward gives a 2-D input (the vision tower's [patches, hidden]) "
        "one activation scale for the whole tensor where the scheme (and vLLM's kernel) keeps one per "
        "row: more damage when vision Linears are quantized; with them kept the two agree to the bit. "
        "Both causes are measured on the run: that one on the loaded model, and the stored dtype (bf16 "
        "runs in bf16) on the float model"
    )

    def write(self, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
        quantize = set(inputs.quantize)
        ignore = [n for n in linear_modules(inputs.model_dir) if n not in quantize]
        return write_checkpoint(inputs.model_dir, ignore, out_dir)

    def quantized_in(self, out_dir: Path) -> set[str]:
        return set(linear_modules(out_dir)) - kept_in_checkpoint(out_dir)

    def load(self, out_dir: Path, inputs: Inputs) -> Runtime:
        model = load_checkpoint(out_dir)
        facts = runtime(model)
        return Runtime(
            forward=logits_of(model),
            loader=facts["loader"],
            weights=facts["weights"],
            inputs=facts["inputs"],
            matmul=facts["matmul"],
            notes=[f"dequantize={facts['dequantize']} (transformers' default: W8A8, not W8A16)"],
            quantized=set(facts["quantized"]),
            dtype=facts["dtype"],
            causes=lambda scorer, metric: two_d_inputs_cause(model, facts["quantized"], scorer, metric),
        )


@contextlib.contextmanager
def scaled_per_row(model: nn.Module, names: list[str]) -> Iterator[None]:
    """The quantized modules see a 2-D input as ``[1, rows, hidden]``: compressed-tensors' dynamic
    per-token scale then gives each row its own (what the scheme and vLLM's kernel do), where it
    gives a 2-D input one scale. Every module's forward is put back on exit."""
    saved = {}
    for name in names:
        module = model.get_submodule(name)
        saved[name] = module.__dict__.get("forward")  # set_forward_quantized's instance forward
        inner = module.forward

        def per_row(x: torch.Tensor, *args: Any, _inner: Callable = inner, **kwargs: Any) -> torch.Tensor:
            return _inner(x[None], *args, **kwargs)[0] if x.dim() == 2 else _inner(x, *args, **kwargs)

        module.forward = per_row
    try:
        yield
    finally:
        for name, forward in saved.items():
            module = model.get_submodule(name)
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def two_d_inputs_cause(model: nn.Module, quantized: list[str], scorer: Any, metric: str) -> list[Cause]:
    """The gap's stated cause measured (``quantize.causes``): the loaded model as transformers runs it
    against the same model with each 2-D input scaled per row, on the test split. 0 where no
    quantized module sees a 2-D input (the vision tower kept)."""
    forward = logits_of(model)
    with torch.no_grad():
        with scaled_per_row(model, quantized):
            per_row = scorer.against(forward)
        value = per_row.score(forward)[metric]
    how = (
        "the checkpoint as transformers runs it against the same loaded model with every 2-D input fed "
        "as [1, rows, hidden] (one scale per row), test split"
    )
    return [Cause("one activation scale per 2-D input", value, how)]
