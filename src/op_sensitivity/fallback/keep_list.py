"""Stage fallback_list: ranked spectrum + policy -> ``fallback_ops.json`` and per-tool exports.

``fallback_ops.json`` (schema_version 1)::

    policy: {name, params, phase, always_keep, never_keep}
    source: {path, sha256}                 the sensitivity report this list was derived from
    ops: [{op_name, module, op_type, tower, score, rank, reason}]    most sensitive first
    totals: {ops_kept, ops_scored, params_kept, params_total, share_params_kept, effective_weight_bits}

``effective_weight_bits`` = (32 * kept params + 8 * other params) / all params, over the weights
of every quantizable op. A tied weight (lm_head / embed_tokens) counts once per op: a quantizer
stores each op's weight in its own precision. Ops kept fp32 by the sensitivity params count as
32-bit too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_dir, dump_json
from ..inventory import OpInfo, module_name
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

SCHEMA_VERSION = 1


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def totals(
    chosen_modules: set[str], excluded_modules: set[str], inventory: list[OpInfo], n_scored: int
) -> dict[str, Any]:
    fp32 = chosen_modules | excluded_modules
    total = sum(op.params for op in inventory)
    kept = sum(op.params for op in inventory if op.name in fp32)
    return {
        "ops_kept": len(chosen_modules),
        "ops_scored": n_scored,
        "params_kept": kept,
        "params_total": total,
        "share_params_kept": round(kept / total, 6) if total else 0.0,
        "effective_weight_bits": round((32 * kept + 8 * (total - kept)) / total, 4) if total else 0.0,
    }


def build_fallback(
    report: dict[str, Any], report_path: Path, inventory: list[OpInfo], p: FallbackParams
) -> dict[str, Any]:
    check_globs(p, [op.name for op in inventory])
    df = select_phase(phase_scores(report, inventory), p.phase)
    chosen = choose(df, p)
    excluded = {module_name(e["op_name"]) for e in report["metadata"]["excluded_ops"]}
    ops = [
        {
            "op_name": r.op_name,
            "module": r.module,
            "op_type": r.op_type,
            "tower": r.tower,
            "score": float(r.score),
            "rank": int(r.rank),
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
        },
        "source": {"path": str(report_path), "sha256": _sha256(report_path)},
        "ops": ops,
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
        dump_json(inc_op_name_dict(o["op_name"] for o in doc["ops"]), tmp / "inc_op_name_dict.json")
        dump_json(modelopt_quant_cfg(modules), tmp / "modelopt_quant_cfg.json")
        dump_json(ort, tmp / "ort_nodes_to_exclude.json")
        ignore = llmcompressor_ignore(modules, inventory)
        dump_json({"ignore": ignore}, tmp / "llmcompressor_ignore.json")
        recipe = yaml.safe_dump(llmcompressor_recipe(ignore), sort_keys=False)
        (tmp / "llmcompressor_recipe.yaml").write_text(recipe)
    dump_json(fallback_metrics(doc), metrics_path)
