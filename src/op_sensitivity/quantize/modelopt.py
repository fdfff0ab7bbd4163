"""ModelOpt INT8 / FP8 unified HF checkpoints of a keep-list, and the model ModelOpt computes from them.

Why: the native engine *predicts* what a keep-list costs under ``modelopt_int8`` / ``modelopt_fp8``;
this writes what a user of our export writes with ModelOpt itself (the stock ``INT8_DEFAULT_CFG`` /
``FP8_DEFAULT_CFG``, deep-copied, with ``fallback.exports.modelopt_quant_cfg``'s entries for every
module the artifact keeps appended after the stock ones, ``mtq.quantize`` with max calibration on
the calibration split the prediction calibrates on) so the prediction can be checked against it.

Which artifact: ModelOpt's HF export (``modelopt.torch.export.export_hf_checkpoint``), the unified
checkpoint vLLM and TensorRT-LLM load. It runs without a GPU in nvidia-modelopt 0.47 on
Qwen2.5-VL, for both configs (checked on the small test model): ``hf_quant_config.json`` (and
``config.json``'s ``quantization_config``, ``quant_method: modelopt``) with ``quant_algo``
``W8A8_SQ_PER_CHANNEL`` (int8 weight codes, one ``weight_scale`` per output row, one static
``input_scale``) or ``FP8`` (float8_e4m3fn codes, one ``weight_scale`` and one ``input_scale`` per
tensor), and ``exclude_modules`` in the hub's names (``lm_head``, ``model.embed_tokens``,
``visual*``, the kept modules). Weights are the deployed bytes (one per quantized weight), so
``bytes`` is the deployed size (``mto.save`` would have stored float32 / bf16 fake-quant weights
plus the quantizer state, not a deployable size; it is not used, as the export runs). The processor
files are copied from the model directory, as vLLM reads them from the checkpoint.

The export's own rework of the calibrated state changes nothing here: for int8 it unifies the input
amax of Linears sharing an input (q/k/v, gate/up), which saw the same tensor during calibration and
so have the same amax already; for FP8 it unifies nothing (``_fuse_shared_input_modules`` skips FP8).

What runs it on CPU (:meth:`_ModelOpt.load`): nothing loads this format on CPU. vLLM and
TensorRT-LLM need a GPU, and transformers 5.24 has no ``modelopt`` quantizer (its
``AUTO_QUANTIZER_MAPPING`` has none). So the runtime is ModelOpt's own fake quant fed from the
checkpoint: a fresh model from the model directory, quantizers inserted by ``mtq.quantize`` with the
same config (no calibration data), then every quantized Linear's weight set to the checkpoint's
codes x ``weight_scale`` and its quantizers' ``amax`` to ``scale x maxbound`` (127 int8, 448 FP8),
the exporter's ``scale = amax / maxbound`` inverted. ModelOpt then fake-quantizes the stored weight
again (the same codes: codes x scale x maxbound / amax is the code within float rounding) and each
input with the stored static scale: int8 ``clamp(round(x x 127 / amax), -128, 127) x amax / 127``,
FP8 ``float8_e4m3fn(clamp(x x 448 / amax, +-448)) x amax / 448`` (``tensor_quant._fp8_eager``: a real
cast to torch's e4m3 dtype, not a bit-level emulation), then ``F.linear`` in the model's dtype. That
is the W8A8 arithmetic of vLLM's kernels up to their accumulation order, on the deployed codes.

ModelOpt's stock configs and the native schemes quantize the same ops of Qwen2.5-VL: the schemes'
``skip`` is the stock config's disabling name globs (``schemes.modelopt.describe``), its class
disables hit only ``nn.Embedding`` (not an op the schemes score), the trailing ``*`` disable keeps
the attention bmm and output quantizers off, and the vision tower's Linears and Conv3d sit under
``*visual*``. So the kept modules' disable entries are all it takes; :meth:`_ModelOpt.write` checks
that the calibrated model's enabled quantizers are exactly ``inputs.quantize`` before anything is
written (an op listed for quantization that a stock glob disables is refused, not re-enabled: the
prediction's scheme skips those ops, so such a list is not one its keep-list gives).

Memory at the 3B size (not run here): the writer holds the model as stored (bf16, ~7.5 GB for
3.75 B parameters), ModelOpt's quantizers (a few tensors per Linear), one calibration batch's
activations, and the export's in-memory state dict (int8 / FP8 codes of the text tower's Linears,
~3 GB, beside the bf16 rest); expect ~12-15 GB peak. A bf16 model is exported with its unquantized
weights in bf16 and its codes computed from the bf16 weights, where the prediction computes in
float32. The loader holds one more model of the stored size.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from ..atomic import atomic_dir
from ..errors import InputError
from ..fallback.exports import modelopt_quant_cfg
from ..model.source import load_model_dir
from ..params import TARGET_SCHEMES
from .base import Batch, Inputs, Runtime, Target, dir_bytes
from .hf_checkpoint import copy_processor, logits_of, meta_model, rename_to_modules

EXTRA = "pip install -e '.[modelopt]'"
QUANT_CONFIG = "hf_quant_config.json"
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the types ModelOpt puts quantizers on here


def quantizable_modules(model: nn.Module) -> list[str]:
    """Modules ModelOpt gives a weight and an input quantizer (Linear, Conv), in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]


def user_config(cfg_name: str, keep: list[str]) -> dict[str, Any]:
    """The config a user of our export builds: the stock config deep-copied, the export's entries for
    ``keep`` appended after the stock ones (ModelOpt's last matching entry wins)."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(getattr(mtq, cfg_name))
    cfg["quant_cfg"] = [*cfg["quant_cfg"], *modelopt_quant_cfg(keep)["quant_cfg"]]
    return cfg


def enabled_quantizers(model: nn.Module) -> dict[str, set[str]]:
    """Module name -> the names of its enabled TensorQuantizers (weight, input, output, bmm...)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    out: dict[str, set[str]] = {}
    for qname, q in model.named_modules():
        if isinstance(q, TensorQuantizer) and q.is_enabled:
            parent, _, leaf = qname.rpartition(".")
            out.setdefault(parent, set()).add(leaf)
    return out


W8A8 = {"weight_quantizer", "input_quantizer"}  # the quantizers a quantized Linear / Conv has on


def w8a8_modules(on: dict[str, set[str]]) -> set[str]:
    """The modules of :func:`enabled_quantizers` with exactly their weight and input quantizers on."""
    return {n for n, q in on.items() if q == W8A8}


def _check_quantizes(model: nn.Module, quantize: list[str], where: str) -> None:
    """Exactly ``quantize`` has its weight and input quantizers on, and no other quantizer is on."""
    on = enabled_quantizers(model)
    w8a8 = w8a8_modules(on)
    odd = sorted(f"{n}: {sorted(q)}" for n, q in on.items() if n not in w8a8)
    if w8a8 != set(quantize) or odd:
        raise InputError(
            f"{where}: ModelOpt quantizes {sorted(w8a8 - set(quantize))[:5]} that the list keeps and keeps "
            f"{sorted(set(quantize) - w8a8)[:5]} that it quantizes (a stock config glob disables them: "
            f"the scheme's skip); other enabled quantizers: {odd[:5]}"
        )


class _ModelOpt(Target):
    """A ModelOpt stock config's unified HF checkpoint; see the module doc."""

    bar = 1e-3
    runs_stored_dtype = True  # the restored model runs in the dtype load_model_dir gives: as stored
    gap = (
        "ModelOpt's own quantizers run the checkpoint's codes and scales. A model stored in float32 "
        "leaves nothing in the arithmetic: the exporter's scale = amax / maxbound does not give every "
        "amax back to the bit (int8: one row's weight moved by one float ulp on the small model, 7e-5 "
        "relative), and float summation order. A model stored in bf16 (a published snapshot) runs in "
        "bf16 where the prediction computes in float32: a cause measured on the run"
    )

    round_trip = (
        "ModelOpt's own quantizers, fed from the checkpoint's codes and scales, check the export's round "
        "trip; the runtimes that serve the checkpoint (vLLM, TensorRT-LLM) need a GPU and did not run "
        "here (docs/deploy.md has the command)"
    )
    cfg_name: ClassVar[str]
    quant_algo: ClassVar[str]
    code_dtype: ClassVar[str]  # the safetensors dtype of a quantized weight
    maxbound: ClassVar[float]  # scale = amax / maxbound in the export
    requires = ("modelopt",)
    extra = EXTRA

    def write(self, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint

        start = time.perf_counter()
        if not inputs.calibration:
            raise InputError(f"{self.name}: no calibration batches (max calibration needs some)")
        model, _, _ = load_model_dir(inputs.model_dir)
        modules = quantizable_modules(model)
        unknown = [n for n in inputs.quantize if n not in set(modules)]
        if unknown:
            raise InputError(
                f"{self.name}: {unknown[:5]} to quantize are not Linear / Conv modules of {inputs.model_dir}"
            )
        quantize = set(inputs.quantize)
        keep = [n for n in modules if n not in quantize]

        def forward_loop(m: nn.Module) -> None:
            with torch.no_grad():
                for batch in inputs.calibration:
                    m(**batch)

        model = mtq.quantize(model, user_config(self.cfg_name, keep), forward_loop)
        _check_quantizes(model, inputs.quantize, f"{self.name} ({self.cfg_name} + keep entries)")
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        with atomic_dir(out_dir) as tmp:
            export_hf_checkpoint(model, export_dir=tmp)
            copy_processor(inputs.model_dir, tmp)
        return {
            "format": self.format,
            "config": f"mtq.{self.cfg_name} + {len(keep)} keep entries",
            "quant_algo": self.quant_algo,
            "quantized": [n for n in modules if n in quantize],
            "kept": keep,
            "dtype": dtype,
            "bytes": dir_bytes(out_dir),
            "seconds": time.perf_counter() - start,
        }

    def _read(self, out_dir: Path) -> tuple[dict[str, str], set[str]]:
        """(module name -> the checkpoint's key prefix, quantized modules), read back from the
        checkpoint's tensors and checked against its ``hf_quant_config.json``."""
        path = out_dir / QUANT_CONFIG
        try:
            quant = json.loads(path.read_text())["quantization"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not a ModelOpt unified checkpoint's quant config ({e})") from e
        if quant.get("quant_algo") != self.quant_algo:
            raise InputError(f"{path}: quant_algo {quant.get('quant_algo')!r}, expected {self.quant_algo!r}")
        model = meta_model(AutoConfig.from_pretrained(out_dir, local_files_only=True))
        rename = rename_to_modules(model)
        dtypes: dict[str, str] = {}
        prefix: dict[str, str] = {}
        for f in sorted(out_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                    name = rename(key)
                    dtypes[name] = handle.get_slice(key).get_dtype()
                    if name.endswith(".weight"):
                        prefix[name.removesuffix(".weight")] = key.removesuffix(".weight")
        modules = quantizable_modules(model)
        scales = ("weight_scale", "input_scale")
        from_tensors = {
            n
            for n in modules
            if dtypes.get(f"{n}.weight") == self.code_dtype and all(f"{n}.{s}" in dtypes for s in scales)
        }
        odd = sorted(
            n
            for n in modules
            if n not in from_tensors
            and (dtypes.get(f"{n}.weight") == self.code_dtype or any(f"{n}.{s}" in dtypes for s in scales))
        )
        exclude = quant.get("exclude_modules") or []
        from_config = {
            n for n in modules if n in prefix and not any(fnmatchcase(prefix[n], p) for p in exclude)
        }
        if odd or from_tensors != from_config:
            raise InputError(
                f"{out_dir}: tensors and {QUANT_CONFIG} disagree (a {self.code_dtype} weight without its "
                f"scales or the reverse: {odd[:5]}; quantized by tensors only: "
                f"{sorted(from_tensors - from_config)[:5]}; by exclude_modules only: "
                f"{sorted(from_config - from_tensors)[:5]})"
            )
        return prefix, from_tensors

    def quantized_in(self, out_dir: Path) -> set[str]:
        return self._read(out_dir)[1]

    def load(self, out_dir: Path, inputs: Inputs) -> Runtime:
        import modelopt.torch.quantization as mtq

        prefix, quantized = self._read(out_dir)
        model, _, _ = load_model_dir(inputs.model_dir)
        keep = [n for n in quantizable_modules(model) if n not in quantized]
        model = mtq.quantize(model, user_config(self.cfg_name, keep), forward_loop=None)
        _check_quantizes(model, sorted(quantized), f"{out_dir} restored in ModelOpt")
        tensors = self._quantized_tensors(out_dir, {prefix[n]: n for n in quantized})
        with torch.no_grad():
            for name in quantized:
                self._set(model.get_submodule(name), **tensors[name])
        facts = self._runtime(model, sorted(quantized))
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return Runtime(
            forward=_logits(model), quantized=w8a8_modules(enabled_quantizers(model)), dtype=dtype, **facts
        )

    @staticmethod
    def _quantized_tensors(out_dir: Path, modules: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
        """Codes and scales of the quantized modules (checkpoint prefix -> module name)."""
        out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in modules.values()}
        for f in sorted(out_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118
                    head, _, leaf = key.rpartition(".")
                    if head in modules and leaf in ("weight", "weight_scale", "input_scale"):
                        out[modules[head]][leaf] = handle.get_tensor(key)
        return out

    def _set(
        self, module: nn.Module, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor
    ) -> None:
        """The checkpoint's weight (codes x scale, in the module's dtype) and the calibrated amax it
        was written from (scale x maxbound), on ModelOpt's quantizers."""
        rows = weight_scale.float().reshape(-1, *([1] * (weight.dim() - 1)))  # per row or one
        module.weight.copy_((weight.float() * rows).to(module.weight.dtype))
        w_amax = module.weight_quantizer.amax
        amax = weight_scale.float() * self.maxbound
        module.weight_quantizer.amax = (
            amax.reshape(w_amax.shape) if w_amax is not None and w_amax.numel() == amax.numel() else amax
        )
        module.input_quantizer.amax = input_scale.float() * self.maxbound

    def _runtime(self, model: nn.Module, quantized: list[str]) -> dict[str, Any]:
        """What the restored model computes, read off its quantizers (checked, not assumed)."""
        modules = [model.get_submodule(n) for n in quantized]
        first = modules[0]
        w, x = first.weight_quantizer, first.input_quantizer
        static = [m.input_quantizer.amax is not None and m.input_quantizer.amax.numel() == 1 for m in modules]
        kinds = {(str(m.weight_quantizer.num_bits), str(m.input_quantizer.num_bits)) for m in modules}
        if not all(static) or len(kinds) != 1:
            raise RuntimeError(f"restored quantizers differ ({kinds}) or an input is not static per tensor")
        # the stored weight survives ModelOpt's weight fake quant: the checkpoint's codes are what runs
        moved = [n for n, m in zip(quantized, modules, strict=True) if not _same_codes(m)]
        if moved:
            raise RuntimeError(f"ModelOpt re-quantizes the stored weights of {moved[:5]} to other codes")
        fp8 = tuple(w.num_bits) == (4, 3) if isinstance(w.num_bits, tuple | list) else False
        dtype = str(first.weight.dtype).removeprefix("torch.")
        per = "per output row" if w.amax.numel() > 1 else "per tensor"
        if fp8:
            weights = (
                f"float8_e4m3fn codes x weight_scale ({per}), re-fake-quantized by ModelOpt (same codes)"
            )
            inputs = (
                "float8_e4m3fn, static per-tensor input_scale: x x 448 / amax clamped to +-448, cast to "
                "torch.float8_e4m3fn and back (ModelOpt's _fp8_eager on CPU)"
            )
        else:
            weights = (
                f"int{w.num_bits} codes x weight_scale ({per}), re-fake-quantized by ModelOpt (same codes)"
            )
            inputs = (
                f"int{x.num_bits} symmetric, static per-tensor input_scale, narrow_range={x.narrow_range}: "
                "round(x x 127 / amax) clamped, times amax / 127 (ModelOpt's _tensor_quant on CPU)"
            )
        return {
            "loader": f"ModelOpt {self.cfg_name} fake quant with the checkpoint's codes and scales "
            "(no CPU loader for the unified checkpoint: vLLM / TensorRT-LLM need a GPU)",
            "weights": weights,
            "inputs": inputs,
            "matmul": f"{dtype} (F.linear on the fake-quantized weight and input)",
            "notes": [
                f"{len(quantized)} modules quantized; quant_algo {self.quant_algo}",
                f"artifact: ModelOpt's unified HF checkpoint ({QUANT_CONFIG}), what vLLM / TensorRT-LLM load",
            ],
        }


def _same_codes(module: nn.Module) -> bool:
    """ModelOpt's weight fake quant gives the stored weight back to within an ulp of its dtype (the
    same codes): float32's bound is 1e-6 relative; a bf16 model (a published snapshot) runs the fake
    quant's scale and cast in bf16, one rounding each, so it is bf16's epsilon (2**-7)."""
    rtol = max(1e-6, torch.finfo(module.weight.dtype).eps)
    with torch.no_grad():
        w = module.weight.float()
        return torch.allclose(module.weight_quantizer(module.weight).float(), w, rtol=rtol, atol=0)


def _logits(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    forward = logits_of(model)

    def run(batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return forward(batch).float()

    return run


class ModeloptInt8(_ModelOpt):
    """``modelopt_int8``: ``INT8_DEFAULT_CFG`` (int8 per-row weights, static per-tensor inputs)."""

    name = "modelopt_int8"
    scheme = TARGET_SCHEMES["modelopt_int8"]
    format = "modelopt-hf-w8a8_sq_per_channel"
    cfg_name = "INT8_DEFAULT_CFG"
    quant_algo = "W8A8_SQ_PER_CHANNEL"
    code_dtype = "I8"
    maxbound = 127.0


class ModeloptFp8(_ModelOpt):
    """``modelopt_fp8``: ``FP8_DEFAULT_CFG`` (e4m3 per-tensor weights and static inputs)."""

    name = "modelopt_fp8"
    scheme = TARGET_SCHEMES["modelopt_fp8"]
    format = "modelopt-hf-fp8"
    cfg_name = "FP8_DEFAULT_CFG"
    quant_algo = "FP8"
    code_dtype = "F8_E4M3"
    maxbound = 448.0
