"""Stage fallback_list: ranked spectrum + policy -> ``fallback_ops.json`` and per-tool exports.

``fallback_ops.json`` (schema_version 2)::

    policy: {name, params, phase, always_keep, never_keep, fused_groups}
    source: {path, sha256}                 the sensitivity report this list was derived from
    curve: {path, sha256} | null           the ranking curve the measured policies read
    ops: [{op_name, module, op_type, tower, score, rank, fused_group, reason}]    most sensitive first
    groups_widened: [{group, added: [module], params_added}]   members kept because a sibling was
    totals: {ops_kept, ops_scored, params_kept, params_total, share_params_kept, effective_weight_bits}

The cost (``inventory.cost``) counts ops kept fp32 by the sensitivity params as kept too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_dir, dump_json, read_json
from ..errors import InputError
from ..inventory import OpInfo, cost, module_name
from ..params import FallbackParams
from ..report.scores import phase_scores, select_phase
from .exports import (
    inc_op_name_dict,
    llmcompressor_ignore,
    llmcompressor_recipe,
    modelopt_quant_cfg,
    ort_nodes_to_exclude,
)
from .policy import check_globs, choose

SCHEMA_VERSION = 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def totals(
    chosen_modules: set[str], excluded_modules: set[str], inventory: list[OpInfo], n_scored: int
) -> dict[str, Any]:
    return {
        "ops_kept": len(chosen_modules),
        "ops_scored": n_scored,
        **cost(chosen_modules | excluded_modules, inventory),
    }


def _widened(ops: list[dict[str, Any]], inventory: list[OpInfo]) -> list[dict[str, Any]]:
    params = {op.name: op.params for op in inventory}
    out: dict[str, dict[str, Any]] = {}
    for o in ops:
        if o["reason"].startswith("fused group "):
            entry = out.setdefault(
                o["fused_group"], {"group": o["fused_group"], "added": [], "params_added": 0}
            )
            entry["added"].append(o["module"])
            entry["params_added"] += params[o["module"]]
    return list(out.values())


def build_fallback(
    report: dict[str, Any],
    report_path: Path,
    inventory: list[OpInfo],
    p: FallbackParams,
    curve: dict[str, Any] | None = None,
    curve_path: Path | None = None,
) -> dict[str, Any]:
    check_globs(p, [op.name for op in inventory])
    df = select_phase(phase_scores(report, inventory), p.phase)
    chosen = choose(df, p, curve, inventory)
    group = {op.name: op.fused_group for op in inventory}
    excluded = {module_name(e["op_name"]) for e in report["metadata"]["excluded_ops"]}
    ops = [
        {
            "op_name": r.op_name,
            "module": r.module,
            "op_type": r.op_type,
            "tower": r.tower,
            "score": float(r.score),
            "rank": int(r.rank),
            "fused_group": group.get(r.module),
            "reason": r.reason,
        }
        for r in chosen.itertuples()
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "policy": {
            "name": p.policy,
            "params": p.settings,
            "phase": p.phase,
            "always_keep": p.always_keep,
            "never_keep": p.never_keep,
            "fused_groups": p.fused_groups,
        },
        "source": {"path": str(report_path), "sha256": _sha256(report_path)},
        "curve": None if curve_path is None else {"path": str(curve_path), "sha256": _sha256(curve_path)},
        "ops": ops,
        "groups_widened": _widened(ops, inventory),
        "totals": totals({o["module"] for o in ops}, excluded, inventory, len(df)),
    }


def fallback_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """For `dvc metrics diff`: what a policy change does to the list."""
    return {"policy": doc["policy"]["name"], "phase": doc["policy"]["phase"], **doc["totals"]}


def write_fallback(
    doc: dict[str, Any], inventory: list[OpInfo], onnx_graph: Path | None, out_dir: Path, metrics_path: Path
) -> None:
    """All files or none: the canonical list and every export land together (metrics last).

    ``onnx_graph``: the exported graph to resolve ONNX Runtime node names from (``exports.onnx_graph``).
    """
    modules = [o["module"] for o in doc["ops"]]
    ort = ort_nodes_to_exclude(modules, onnx_graph)
    with atomic_dir(out_dir) as tmp:
        dump_json(doc, tmp / "fallback_ops.json")
        dump_json(inc_op_name_dict(modules), tmp / "inc_op_name_dict.json")
        dump_json(modelopt_quant_cfg(modules), tmp / "modelopt_quant_cfg.json")
        dump_json(ort, tmp / "ort_nodes_to_exclude.json")
        ignore = llmcompressor_ignore(modules, inventory)
        dump_json({"ignore": ignore}, tmp / "llmcompressor_ignore.json")
        recipe = yaml.safe_dump(llmcompressor_recipe(ignore), sort_keys=False)
        (tmp / "llmcompressor_recipe.yaml").write_text(recipe)
    dump_json(fallback_metrics(doc), metrics_path)


def read_keep_list(path: Path) -> dict[str, Any]:
    """Read ``fallback_ops.json`` back, checking the fields a consumer of the list reads."""
    doc = read_json(path, "keep-list", "fallback_list")
    ok = (
        isinstance(doc, dict)
        and doc.get("schema_version") == SCHEMA_VERSION
        and isinstance(doc.get("ops"), list)
    )
    ok = ok and all(isinstance(o, dict) and isinstance(o.get("module"), str) for o in doc["ops"])
    if not ok:
        raise InputError(
            f"{path}: not a keep-list of schema_version {SCHEMA_VERSION} (expected ops with module)"
        )
    return doc
