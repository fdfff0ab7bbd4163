"""INC's own quantized model of the main pass's keep-list, saved by INC and reloaded by INC.

Why: the main pass predicts (native engine, scheme ``inc_cpu``) what a keep-list costs under
INC's static W8A8 PTQ; validate already runs that PTQ in memory (``validation.inc_check``). A user
deploys what INC saves: ``quantization.fit`` with the exported ``op_name_dict``
(``fallback.exports.inc_op_name_dict``), then ``q_model.save(dir)``, then, in the serving process,
INC's ``neural_compressor.utils.pytorch.load(dir, fp32_model)`` through :func:`load_inc` (INC's
load alone builds a Qwen2.5-VL that fails at its first forward: ``engines.inc_loop.load_q_model``).
This target does exactly that and measures the reloaded model, without the compat patch, so what
is scored is what a user's process runs.

What INC 3.7.1 (2.x API, ``pytorch_fx``) writes: one file, ``best_model.pt`` (``torch.save`` of
the quantized model's ``state_dict``: packed int8 weights with their per-channel scales, the
calibrated activation scales and zero points, and INC's tuning config under ``best_configure``:
each op's dtypes, and ``fx_sub_module_list``, the sub-modules INC traced one by one because FX
cannot trace Qwen2.5-VL whole). No ``best_configure.json``: INC writes that for its IPEX backend.
INC's loader needs the float32 model beside the file: it replays the conversion from the config
and then loads the state. :meth:`Inc.quantized_in` reads the config back from the file.

What the reloaded model computes on CPU (read off its modules, :func:`runtime_facts`): torch.ao
quantized modules. Each quantized Linear / Conv3d takes a quint8 input (quantized per tensor
with its calibrated static scale and zero point; 7-bit where INC's ``reduce_range`` is set, on a
CPU without VNNI), multiplies by qint8 per-output-channel weights in torch's quantized engine
(fbgemm / x86) with int32 accumulation, and requantizes its output to quint8 with a calibrated
scale; tensors are dequantized to float32 where a traced sub-module ends. The Embedding is
weight-only (uint8 rows with float scale and zero point). Kept ops stay float32 ``nn`` modules.

Size: INC's PTQ holds about 5x the float32 model (``engines.memory.inc_peak_gib``: 71 GiB for the 3B),
which is why validate compares a carved copy above ``crosscheck.whole_max_params``. A carved copy
is not a deployable model, so this target does not carve: it refuses a model above that bound
(``Inputs.max_params``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_dir
from ..engines.inc_loop import (
    SAVED_MODEL,
    int8_and_fp32,
    load_q_model,
    ptq_model,
    quantized_logits,
    save_q_model,
    saved_config,
)
from ..engines.memory import inc_peak_gib
from ..errors import InputError
from ..fallback.exports import inc_op_name_dict
from ..inventory import module_name, op_inventory
from ..model.source import load_model_dir, read_card
from ..params import TARGET_SCHEMES
from .base import Inputs, Runtime, Target, dir_bytes


def load_inc(saved_dir: str | Path, fp32_model: nn.Module) -> nn.Module:
    """Serve the ``inc`` target's artifact: INC's own loader (``neural_compressor.utils.pytorch.load``)
    run the one way that gives a working Qwen2.5-VL, then the strict state check
    (``engines.inc_loop.load_q_model``, which says why INC's ``load`` alone fails on it). ``fp32_model``:
    the model it was quantized from (``Qwen2_5_VLForConditionalGeneration.from_pretrained``); it
    is converted in place to float32 and returned quantized, in eval mode. docs/deploy.md shows it."""
    return load_q_model(Path(saved_dir), fp32_model)


FORMAT = "inc-pytorch-fx"  # INC's PyTorchFXModel.save: best_model.pt (state_dict + best_configure)
EXTRA = "neural-compressor==3.7.1 is a core dependency of this project: pip install -e ."
QUANTIZED_TYPES = (
    torch.ao.nn.quantized.Linear,
    torch.ao.nn.quantized.Conv3d,
    torch.ao.nn.quantized.Embedding,
)


def check_size(model_dir: Path, max_params: int) -> int:
    """The model's parameter count (its card); refused above ``max_params``: INC's PTQ of the whole
    model would not fit (validate carves there, which a deployment cannot)."""
    params = read_card(model_dir).params
    if params > max_params:
        raise InputError(
            f"quantize target inc: {model_dir} has {params:,} parameters, above "
            f"crosscheck.whole_max_params ({max_params:,}): INC's PTQ of the whole model needs "
            f"~{inc_peak_gib(params):.0f} GiB (5x its float32 weights), and a carved copy is not a "
            "deployable model; drop inc from quantize.targets (compressed_tensors deploys a W8A8 "
            "checkpoint of any size)"
        )
    return params


def keep_fp32(model: nn.Module, quantize: list[str]) -> list[str]:
    """The model's quantizable modules (``op_inventory``: what INC's capability covers) that the
    artifact keeps in float32: the keep-list, the pass's exclusions, and the ops INC cannot
    quantize. The exported ``op_name_dict`` is built from these, as a user of the export passes it.
    A name in ``quantize`` that is no quantizable module is refused (INC would quietly skip it)."""
    ops = [op.name for op in op_inventory(model)]
    unknown = sorted(set(quantize) - set(ops))
    if unknown:
        raise InputError(f"quantize target inc: {unknown[:5]} are not quantizable modules of the model")
    chosen = set(quantize)
    return [name for name in ops if name not in chosen]


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """The modules a loaded INC model runs as torch.ao quantized modules -> their type, by module
    name (INC's ``<path>.module`` wrappers mapped back to ``<path>``)."""
    return {
        module_name(name): type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, QUANTIZED_TYPES)
    }


def _scheme(weight: torch.Tensor) -> str:
    return f"{str(weight.dtype).removeprefix('torch.')} {str(weight.qscheme()).removeprefix('torch.')}"


def runtime_facts(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """What the reloaded model computes, read off its modules and its stored config, so that an INC
    or torch release that changes the route is visible in the report."""
    dense: dict[str, set[str]] = {}
    tables: set[str] = set()
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.Embedding):
            tables.add(_scheme(m.weight()))
        elif isinstance(m, QUANTIZED_TYPES):
            dense.setdefault(_scheme(m.weight()), set()).add(type(m).__name__)
    if not dense and not tables:
        raise RuntimeError("INC's loader returned a model with no quantized module")
    engine = torch.backends.quantized.engine
    reduce_range = bool(config.get("reduce_range"))
    weights = "; ".join(f"{', '.join(sorted(t))}: {s}" for s, t in sorted(dense.items()))
    if tables:
        weights += f"; Embedding: {', '.join(sorted(tables))} (weight-only: rows dequantized on lookup)"
    bits = "7-bit range (reduce_range)" if reduce_range else "8-bit range"
    notes = [
        f"INC's traced sub-modules: {len(config.get('fx_sub_module_list') or [])} "
        "(fx_sub_module_list; FX cannot trace Qwen2.5-VL whole)"
    ]
    bf16 = config.get("bf16_ops_list") or []
    if bf16:
        notes.append(f"INC runs {len(bf16)} kept ops in bf16 (bf16_ops_list): {bf16[:5]}")
    return {
        "loader": "neural_compressor.utils.pytorch.load (INC's loader, onto the float32 model)",
        "weights": weights,
        "inputs": f"quint8 per tensor, static (calibrated scale and zero point), {bits}",
        "matmul": f"int8 x uint8 -> int32 in torch's quantized engine ({engine}), output requantized "
        "to quint8 (calibrated scale), float32 where a traced sub-module ends",
        "notes": notes,
        "reduce_range": reduce_range,
        "engine": engine,
    }


class Inc(Target):
    """``inc``: INC's static W8A8 PTQ of the main pass's keep-list (``sensitivity.native.scheme``
    ``inc_cpu``), saved with ``q_model.save`` and measured after INC's ``load``."""

    name = "inc"
    scheme = TARGET_SCHEMES["inc"]
    format = FORMAT
    requires = ("neural_compressor",)
    extra = EXTRA
    bar = 1e-3
    gap = (
        "none in the arithmetic: the reloaded model runs the torch.ao int8 kernels the inc_cpu scheme "
        "predicts with, on the same calibration; only float summation order (a thread count, a CPU)"
    )

    def write(self, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
        """PTQ from the exported op_name_dict, saved by INC into the atomic directory."""
        check_size(inputs.model_dir, inputs.max_params)
        start = time.perf_counter()
        model, _, _ = load_model_dir(inputs.model_dir)
        kept = keep_fp32(model, inputs.quantize)
        batch_size = max(b["input_ids"].shape[0] for b in inputs.calibration)
        q_model = ptq_model(model, inputs.calibration, batch_size, inc_op_name_dict(kept), inputs.workspace)
        ptq_seconds = time.perf_counter() - start
        with atomic_dir(out_dir) as tmp:
            save_q_model(q_model, tmp)
        int8, fp32 = int8_and_fp32(saved_config(out_dir))
        return {
            "format": FORMAT,
            "files": [SAVED_MODEL],
            "quantized": int8,
            "kept": fp32,
            "bytes": dir_bytes(out_dir),
            "seconds": time.perf_counter() - start,
            "ptq_seconds": ptq_seconds,
        }

    def quantized_in(self, out_dir: Path) -> set[str]:
        return set(int8_and_fp32(saved_config(out_dir))[0])

    def load(self, out_dir: Path, inputs: Inputs) -> Runtime:
        fp32_model, _, _ = load_model_dir(inputs.model_dir)
        model = load_inc(out_dir, fp32_model)
        facts = runtime_facts(model, saved_config(out_dir))
        return Runtime(
            forward=quantized_logits(model, compat=False),  # as a user's process runs it
            loader=facts["loader"],
            weights=facts["weights"],
            inputs=facts["inputs"],
            matmul=facts["matmul"],
            notes=facts["notes"],
            quantized=set(quantized_modules(model)),
        )
