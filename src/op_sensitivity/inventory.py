"""Op inventory: every quantizable module of the model, with its tower.

Artifact ``op_inventory.json``::

    {"schema_version": 2, "model_type": str, "ops": [OpInfo, ...], "totals": {tower: {"ops": n, "params": n}}}

``OpInfo.fused_group`` names the group of modules a serving runtime fuses into one layer (vLLM,
SGLang and TensorRT-LLM fuse q/k/v and gate/up and refuse a checkpoint where only some members
are quantized); ``model.fused`` finds the groups from the model's own dataflow.

``OpInfo.weight_dtype`` is the dtype the model stores the op's weight in (``float32`` for the
embedded tiny model, ``bfloat16`` for a published Qwen2.5-VL snapshot and ``full_size_random``):
the dtype every checkpoint writer here keeps an unquantized op in, so :func:`cost` counts a kept
weight at its bits (:func:`weight_bits`), not at float32's.

``OpInfo.name`` is the module path (``model.language_model.layers.0.mlp.up_proj``). INC may report the
same op as ``<name>.module`` when it wrapped the module for sub-graph tracing; :func:`module_name`
maps INC names back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import dump_json
from .errors import InputError

SCHEMA_VERSION = 2
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
TOWERS = ("vision", "text", "lm_head")


@dataclass(frozen=True)
class OpInfo:
    name: str
    type: str
    shape: list[int]
    params: int
    tower: str
    tied_with: str | None
    fused_group: str | None = None  # siblings that read the same input tensor (q/k/v, gate/up)
    weight_dtype: str = "float32"  # the stored dtype of the weight (what a kept op is deployed in)


def weight_bits(op: OpInfo) -> int:
    """Bits per weight of ``op`` as stored (16 for bfloat16/float16, 32 for float32)."""
    return torch.finfo(getattr(torch, op.weight_dtype)).bits


def tower_of(name: str) -> str:
    if name == "lm_head" or name.startswith("lm_head."):
        return "lm_head"
    if name.startswith(("model.visual.", "visual.")):
        return "vision"
    return "text"


def module_name(inc_op_name: str) -> str:
    """INC names sub-graph-wrapped modules ``<path>.module``; the inventory uses ``<path>``."""
    return inc_op_name[: -len(".module")] if inc_op_name.endswith(".module") else inc_op_name


def op_inventory(model: nn.Module, fused: dict[str, str] | None = None) -> list[OpInfo]:
    """Quantizable modules in module (forward-definition) order; tied weights are named once per user.

    ``fused``: module -> fused group (``model.fused.fused_groups``).
    """
    fused = fused or {}
    owner: dict[int, str] = {}
    ops = []
    for name, mod in model.named_modules():
        if not isinstance(mod, QUANTIZABLE):
            continue
        weight = mod.weight
        tied = owner.setdefault(id(weight), name)
        params = sum(p.numel() for p in mod.parameters(recurse=False))
        ops.append(
            OpInfo(
                name,
                type(mod).__name__,
                list(weight.shape),
                params,
                tower_of(name),
                None if tied == name else tied,
                fused.get(name),
                str(weight.dtype).removeprefix("torch."),
            )
        )
    return ops


def cost(kept: set[str], inventory: list[OpInfo]) -> dict[str, Any]:
    """What keeping ``kept`` in high precision costs, over the weights of every quantizable op.

    ``effective_weight_bits`` = (stored bits x kept params + 8 x other params) / all params: a kept
    op stays in the dtype the model stores it in (:func:`weight_bits`; 16 for a bf16 checkpoint,
    which is what the compressed-tensors, ModelOpt and INC artifacts keep; counting 32 there
    overstated a kept op's cost twice over). ``kept_weight_bits``: those stored bits (one number
    when the ops share a dtype, as every Qwen2.5-VL checkpoint does; else the params-weighted mean
    over the kept ops, or over all ops when none is kept). A tied weight (lm_head /
    embed_tokens) counts once per op: a quantizer stores each op's weight in its own precision.
    """
    total = sum(op.params for op in inventory)
    kept_ops = [op for op in inventory if op.name in kept]
    params_kept = sum(op.params for op in kept_ops)
    kept_bits = sum(op.params * weight_bits(op) for op in kept_ops)
    over = kept_ops or inventory
    stored = {weight_bits(op) for op in over}
    weights = sum(op.params for op in over)
    if len(stored) == 1:
        kept_weight_bits: float | None = stored.pop()
    else:
        mean = sum(o.params * weight_bits(o) for o in over) / weights if weights else None
        kept_weight_bits = None if mean is None else round(mean, 4)
    return {
        "params_kept": params_kept,
        "params_total": total,
        "share_params_kept": round(params_kept / total, 6) if total else 0.0,
        "effective_weight_bits": round((kept_bits + 8 * (total - params_kept)) / total, 4) if total else 0.0,
        "kept_weight_bits": kept_weight_bits,
    }


def write_inventory(ops: list[OpInfo], model_type: str, path: Path) -> dict:

    totals: dict[str, dict[str, int]] = {t: {"ops": 0, "params": 0} for t in TOWERS}
    for op in ops:
        totals[op.tower]["ops"] += 1
        totals[op.tower]["params"] += 0 if op.tied_with else op.params
    doc = {
        "schema_version": SCHEMA_VERSION,
        "model_type": model_type,
        "ops": [asdict(o) for o in ops],
        "totals": totals,
    }
    dump_json(doc, path)
    return doc


_OP_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "type": (str,),
    "shape": (list,),
    "params": (int,),
    "tower": (str,),
    "tied_with": (str, type(None)),
    "fused_group": (str, type(None)),
    "weight_dtype": (str,),
}


def _check_op(raw: Any, i: int) -> str | None:
    """What is wrong with ``ops[i]`` of an inventory (None: nothing)."""
    if not isinstance(raw, dict):
        return f"ops[{i}]: expected an object, got {raw!r}"
    unknown = sorted(set(raw) - set(_OP_TYPES))
    if unknown:
        return f"ops[{i}]: unknown key {unknown[0]!r}"
    for key, kinds in _OP_TYPES.items():
        if key not in raw and key != "fused_group":
            return f"ops[{i}].{key}: missing"
        value = raw.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            return f"ops[{i}].{key}: expected {expected}, got {value!r}"
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw["shape"]):
        return f"ops[{i}].shape: expected a list of sizes, got {raw['shape']!r}"
    if raw["tower"] not in TOWERS:
        return f"ops[{i}].tower: expected one of {', '.join(TOWERS)}, got {raw['tower']!r}"
    dtype = getattr(torch, raw["weight_dtype"], None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return f"ops[{i}].weight_dtype: expected a torch floating dtype name, got {raw['weight_dtype']!r}"
    return None


def read_inventory(path: Path) -> list[OpInfo]:
    """Read ``op_inventory.json`` back, every op checked field by field (a bad one is named)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: op inventory missing (run the load_model stage first)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not an op inventory of schema_version {SCHEMA_VERSION} ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("ops"), list):
        raise InputError(
            f"{path}: not an op inventory of schema_version {SCHEMA_VERSION} (expected an object with "
            "a list 'ops'; rerun the load_model stage)"
        )
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise InputError(
            f"{path}: schema_version {SCHEMA_VERSION} expected, got {doc.get('schema_version')!r} "
            "(rerun the load_model stage)"
        )
    for i, raw in enumerate(doc["ops"]):
        problem = _check_op(raw, i)
        if problem:
            raise InputError(f"{path}: {problem} (rerun the load_model stage)")
    ops = [OpInfo(**o) for o in doc["ops"]]
    seen: set[str] = set()
    for i, op in enumerate(ops):
        if op.name in seen:
            raise InputError(f"{path}: ops[{i}]: {op.name!r} listed twice (rerun the load_model stage)")
        seen.add(op.name)
    if not ops:
        raise InputError(f"{path}: no ops (rerun the load_model stage)")
    return ops


def check_ops_in_model(ops: list[OpInfo], model: nn.Module, path: Path) -> None:
    """Every inventory op must be a module of ``model``, of the type the inventory says: checked before
    any pass starts (an inventory of another model would fail hours in, or score the wrong ops)."""
    modules = dict(model.named_modules())
    for i, op in enumerate(ops):
        module = modules.get(op.name)
        if module is None:
            raise InputError(
                f"{path}: ops[{i}] {op.name!r} is not a module of the model (an inventory of another "
                "model? rerun the load_model stage)"
            )
        if type(module).__name__ != op.type:
            raise InputError(
                f"{path}: ops[{i}] {op.name!r} is a {type(module).__name__} in the model, the inventory "
                f"says {op.type} (rerun the load_model stage)"
            )
