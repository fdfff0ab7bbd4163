"""Op inventory: every quantizable module of the model, with its tower.

Artifact ``op_inventory.json``::

    {"schema_version": 2, "model_type": str, "ops": [OpInfo, ...], "totals": {tower: {"ops": n, "params": n}}}

``OpInfo.fused_group`` names the group of modules a serving runtime fuses into one layer (vLLM,
SGLang and TensorRT-LLM fuse q/k/v and gate/up and refuse a checkpoint where only some members
are quantized); ``model.fused`` finds the groups from the model's own dataflow.

``OpInfo.name`` is the module path (``model.language_model.layers.0.mlp.up_proj``). INC may report the
same op as ``<name>.module`` when it wrapped the module for sub-graph tracing; :func:`module_name`
maps INC names back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
            )
        )
    return ops


def cost(kept: set[str], inventory: list[OpInfo]) -> dict[str, Any]:
    """What keeping ``kept`` in high precision costs, over the weights of every quantizable op.

    ``effective_weight_bits`` = (32 * kept params + 8 * other params) / all params. A tied weight
    (lm_head / embed_tokens) counts once per op: a quantizer stores each op's weight in its own
    precision.
    """
    total = sum(op.params for op in inventory)
    params_kept = sum(op.params for op in inventory if op.name in kept)
    return {
        "params_kept": params_kept,
        "params_total": total,
        "share_params_kept": round(params_kept / total, 6) if total else 0.0,
        "effective_weight_bits": round((32 * params_kept + 8 * (total - params_kept)) / total, 4)
        if total
        else 0.0,
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


def read_inventory(path: Path) -> list[OpInfo]:
    try:
        doc = json.loads(Path(path).read_text())
        ops = [OpInfo(**o) for o in doc["ops"]]
    except FileNotFoundError as e:
        raise InputError(f"{path}: op inventory missing (run the load_model stage first)") from e
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not an op inventory of schema_version {SCHEMA_VERSION} ({e})") from e
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise InputError(
            f"{path}: schema_version {SCHEMA_VERSION} expected, got {doc.get('schema_version')!r} "
            "(rerun the load_model stage)"
        )
    return ops
