"""Stage fallback_list: ranked spectrum + policy -> ``fallback_ops.json`` and per-tool exports.

``fallback_ops.json`` (schema_version 2)::

    policy: {name, params, phase, ranking, reason, always_keep, never_keep, fused_groups}
                                           ranking: the one measured_budget walked (auto resolved), else null;
                                           reason: the policy's own, in words (what it measured)
    source: {path, sha256}                 the sensitivity report this list was derived from
    scheme: str                            the scheme that report was measured under
    curve: {path, sha256} | null           the ranking curve the measured policies read
    ops: [{op_name, module, op_type, tower, score, rank, fused_group, reason}]    most sensitive first
    groups_widened: [{group, added: [module], params_added}]   members kept because a sibling was
    totals: {ops_kept, ops_scored, params_kept, params_total, share_params_kept, effective_weight_bits,
             kept_weight_bits}     (inventory.cost) a kept op counted at its stored dtype's bits:
                                   kept_weight_bits, 16 for a bf16 checkpoint, 32 for the tiny float32 one

Each tool's export is built from the spectrum of that tool's own scheme when stage
scheme_sensitivity ran it (``EXPORT_SCHEME``; the list itself in ``schemes/<scheme>.json``), else
from the main spectrum. ``exports.json`` says which: ``{file: {scheme, path, sha256, ops_kept}}``
(a file of its own, so a new scheme does not change the list the validate stage reads), and
``deployed_by``: the quantize target that deploys the export and where it writes its artifact and
measured document (``{target, artifact, document}``; written there when ``quantize.targets`` lists
the target, and the report's Deployment section lists the targets built: reading
``quantize.targets`` here would rerun this stage, the measured walk included, for a new target). The
ModelOpt, ONNX Runtime and llm-compressor JSON exports carry the same ``spectrum`` entry.
A measured policy (``measured_budget``, ``bits_budget``) reads a curve measured under the main
scheme; on another scheme's spectrum it becomes ``top_k`` with the number of ops it picked on the
main one (``policy.derived_from`` says so), so every tool keeps as many ops, its own most sensitive:
an always-kept op of the main list that the scheme does not score (``lm_head`` under ModelOpt and
compressed-tensors) counts too, and one of the scheme's own ops takes its place.

The cost (``inventory.cost``) counts ops kept fp32 by the sensitivity params as kept too, and a
kept op at the bits of the dtype the model stores it in (the inventory's ``weight_dtype``): the
checkpoints (compressed-tensors, ModelOpt, INC) keep an unquantized op as stored, so a bf16 model's
kept ops cost 16 bits, not 32; ``totals.kept_weight_bits`` names the figure used. The ONNX QDQ
model (``ort_qdq``) is the exception: its export upcasts to float32 (docs/artifacts.md).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_dir, dump_json, read_json
from ..engines.artifact import scheme_name
from ..errors import InputError
from ..inventory import OpInfo, cost, module_name
from ..params import FallbackParams
from ..phases import FALLBACK, REQUANT
from ..report.scores import phase_scores, select_phase
from .exports import (
    inc_op_name_dict,
    llmcompressor_ignore,
    llmcompressor_recipe,
    modelopt_quant_cfg,
    ort_nodes_to_exclude,
)
from .policy import MEASURED_POLICIES, Measure, check_globs, choose, walked_ranking

SCHEMA_VERSION = 2
# export file -> the scheme whose spectrum it is built from, when that scheme was run
EXPORT_SCHEME = {
    "inc_op_name_dict.json": "inc_cpu",
    "modelopt_quant_cfg.json": "modelopt_int8",
    "modelopt_fp8_quant_cfg.json": "modelopt_fp8",
    "ort_nodes_to_exclude.json": "ort_qdq",
    "llmcompressor_ignore.json": "llmcompressor_w8a8",
}
EXPORT_TARGET = {  # the quantize target deploying each export (params.TARGET_SCHEMES: the same scheme)
    "inc_op_name_dict.json": "inc",
    "modelopt_quant_cfg.json": "modelopt_int8",
    "modelopt_fp8_quant_cfg.json": "modelopt_fp8",
    "ort_nodes_to_exclude.json": "ort_qdq",
    "llmcompressor_ignore.json": "compressed_tensors",
}

log = logging.getLogger(__name__)


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
    measure: Measure | None = None,
) -> dict[str, Any]:
    """The keep-list document; ``measure``: the selection split's measure of a list, with which
    ``measured_budget`` measures the lists it would ship (``policy``)."""
    check_globs(p, [op.name for op in inventory])
    df = select_phase(phase_scores(report, inventory), p.phase)
    chosen = choose(df, p, curve, inventory, measure)
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
            "ranking": walked_ranking(p, curve),
            "reason": chosen.attrs["reason"]
            + past_exact_top(report, ops, p, walked_ranking(p, curve), curve),
            "always_keep": p.always_keep,
            "never_keep": p.never_keep,
            "fused_groups": p.fused_groups,
        },
        "source": {"path": str(report_path), "sha256": _sha256(report_path)},
        "scheme": scheme_name(report),
        "curve": None if curve_path is None else {"path": str(curve_path), "sha256": _sha256(curve_path)},
        "ops": ops,
        "groups_widened": _widened(ops, inventory),
        "totals": totals({o["module"] for o in ops}, excluded, inventory, len(df)),
    }


def _depth_read(
    ops: list[dict[str, Any]], p: FallbackParams, ranking: str | None, curve: dict[str, Any] | None
) -> tuple[int, str]:
    """How deep into which ranking of the sensitivity report the policy's own pick reads (0: none),
    and that ranking in words.

    ``measured_budget`` walks ``ranking`` (``auto`` resolved) on the curve: fallback and requant
    are the report's; the measured ranking is float32 (the curve stage's) over its single-op pool
    and the fallback ranking's order past it. ``bits_budget`` reads no order, only the pool's
    membership. Those pools (when not every op) are the top of the fallback and requant rankings.
    The other policies read ``p.phase`` (fallback, requant or both)."""
    mine = [o for o in ops if o["reason"].startswith(f"{p.policy}:")]
    if p.policy not in MEASURED_POLICIES or curve is None:
        return max((o["rank"] for o in mine), default=0), f"the {p.phase} ranking"
    orders = curve["rankings"]
    place = {r: {m: i + 1 for i, m in enumerate(orders[r])} for r in (FALLBACK, REQUANT)}
    pool = set(curve["single_op"])
    # a pool of the top k of both phase rankings: membership reads each op's better rank
    pool_depth = 0 if len(pool) >= len(curve["ops"]) else max(min(place[r][m] for r in place) for m in pool)
    if p.policy == "measured_budget" and ranking in place:
        return max((place[ranking][o["module"]] for o in mine), default=0), f"the {ranking} ranking"
    tail = [place[FALLBACK][o["module"]] for o in mine if o["module"] not in pool]
    if p.policy == "measured_budget" and tail:
        return max(tail), f"the {FALLBACK} ranking (the measured ranking past its single-op pool)"
    return pool_depth, f"the {FALLBACK} and {REQUANT} rankings (their top: the single-op pool)"


def past_exact_top(
    report: dict[str, Any],
    ops: list[dict[str, Any]],
    p: FallbackParams,
    ranking: str | None = None,
    curve: dict[str, Any] | None = None,
) -> str:
    """Where a screened pass's ranking is read past its float32 top (``engines.screening``): said in
    the policy's reason and logged, as the order there is the fast precision's. The depth is read in
    the ranking the policy used (:func:`_depth_read`: a ``measured_budget`` walk's ``ranking``, not
    ``p.phase``)."""
    screening = report["metadata"].get("screening")
    if screening is None:
        return ""
    unsettled = screening.get("budget", {}).get("unsettled", {})
    if unsettled and ops:
        note = (
            f"; the {screening['precision']}-screened pass reached sensitivity.native.exact_budget before "
            f"its top {screening['exact_top']} was settled ({', '.join(unsettled)}): the list may not be "
            "the one exact trials would give (raise exact_budget)"
        )
        log.warning("fallback list%s", note)
        return note
    depth, read = _depth_read(ops, p, ranking, curve)
    if depth <= screening["exact_top"]:
        return ""
    note = (
        f"; the list reaches rank {depth} of {read}, past the top "
        f"{screening['exact_top']} that the {screening['precision']}-screened pass measured in float32 "
        "(raise sensitivity.native.exact_top to make it exact)"
    )
    log.warning("fallback list%s", note)
    return note


def scheme_policy(
    p: FallbackParams, main: dict[str, Any], scored: set[str]
) -> tuple[FallbackParams, str | None]:
    """The policy on another scheme's spectrum (``scored``: the modules it scored): a measured one
    becomes top_k with the main list's size. Why the always-kept ops count: the main pick was
    measured with them kept, and a scheme that does not score one of them (ModelOpt, compressed-tensors
    leave ``lm_head`` float anyway) would otherwise ship a smaller list, often an empty one that
    exercises nothing of its runtime; it keeps one of its own most sensitive ops in their place."""
    if p.policy not in MEASURED_POLICIES:
        return p, None
    picked = sum(o["reason"].startswith(f"{p.policy}:") for o in main["ops"])
    unscored = [
        o["module"]
        for o in main["ops"]
        if o["reason"].startswith("always_keep") and o["module"] not in scored
    ]
    k = min(picked + len(unscored), len(scored))
    note = f"{p.policy} picked {picked} ops on the main spectrum"
    if unscored:
        note += f" and kept {', '.join(unscored)} (not scored under this scheme)"
    note += f"; the top {k} of this scheme's own ranking"
    return replace(p, policy="top_k", settings={"k": k}), note


def scheme_fallbacks(
    main: dict[str, Any],
    spectra: dict[str, tuple[dict[str, Any], Path]],
    inventory: list[OpInfo],
    p: FallbackParams,
) -> dict[str, dict[str, Any]]:
    """One keep-list per scheme that was run (``spectra``: name -> (report, path))."""
    out = {}
    for name, (report, path) in spectra.items():
        scored = {o["module"] for o in report["phases"][FALLBACK]["ops"]}
        policy, note = scheme_policy(p, main, scored)
        doc = build_fallback(report, path, inventory, policy)
        doc["policy"]["derived_from"] = note
        out[name] = doc
    return out


def fallback_metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The list's headline numbers for ``dvc metrics``: its size and what it costs in effective
    weight bits (the policy, phase and params shares stay in ``fallback_ops.json``)."""
    totals = doc["totals"]
    return {"kept": totals["ops_kept"], "bits": totals["effective_weight_bits"]}


def write_fallback(
    doc: dict[str, Any],
    inventory: list[OpInfo],
    onnx_graph: Path | None,
    out_dir: Path,
    metrics_path: Path,
    scheme_docs: dict[str, dict[str, Any]] | None = None,
    onnx_where: str = "fallback.onnx_model",
    deploy_dirs: tuple[Path, Path] | None = None,
) -> None:
    """All files or none: the canonical list and every export land together (metrics last).

    ``onnx_graph``: the exported graph to resolve ONNX Runtime node names from (``exports.onnx_graph``).
    ``scheme_docs``: :func:`scheme_fallbacks`; each export takes its own scheme's list where there is one.
    ``onnx_where``: the param naming the graph, for errors (a graph not of this model, a kept module
    with no node in it: ``exports.ort_nodes_to_exclude``), raised before anything is written.
    ``deploy_dirs``: the quantize stage's artifact and document directories (``deployed_by``).
    """
    scheme_docs = scheme_docs or {}
    source = {f: scheme_docs.get(s, doc) for f, s in EXPORT_SCHEME.items()}

    def modules(file: str) -> list[str]:
        return [o["module"] for o in source[file]["ops"]]

    def spectrum(file: str) -> dict[str, Any]:
        d = source[file]
        return {"scheme": d["scheme"], **d["source"], "ops_kept": len(d["ops"])}

    def pointer(file: str) -> dict[str, Any]:
        target = EXPORT_TARGET[file]
        if deploy_dirs is None:
            return spectrum(file)
        artifacts, docs = deploy_dirs
        by = {"target": target, "artifact": str(artifacts / target), "document": str(docs / f"{target}.json")}
        return {**spectrum(file), "deployed_by": by}

    ort = ort_nodes_to_exclude(
        modules("ort_nodes_to_exclude.json"), onnx_graph, onnx_where, [op.name for op in inventory]
    )
    with atomic_dir(out_dir) as tmp:
        dump_json(doc, tmp / "fallback_ops.json")
        dump_json({f: pointer(f) for f in EXPORT_SCHEME}, tmp / "exports.json")
        dump_json(inc_op_name_dict(modules("inc_op_name_dict.json")), tmp / "inc_op_name_dict.json")
        for file in ("modelopt_quant_cfg.json", "modelopt_fp8_quant_cfg.json"):
            dump_json({**modelopt_quant_cfg(modules(file)), "spectrum": spectrum(file)}, tmp / file)
        dump_json(
            {**ort, "spectrum": spectrum("ort_nodes_to_exclude.json")}, tmp / "ort_nodes_to_exclude.json"
        )
        ignore = llmcompressor_ignore(modules("llmcompressor_ignore.json"), inventory)
        dump_json(
            {"ignore": ignore, "spectrum": spectrum("llmcompressor_ignore.json")},
            tmp / "llmcompressor_ignore.json",
        )
        recipe = yaml.safe_dump(llmcompressor_recipe(ignore), sort_keys=False)
        (tmp / "llmcompressor_recipe.yaml").write_text(recipe)
        for name, d in scheme_docs.items():
            dump_json(d, tmp / "schemes" / f"{name}.json")
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


def check_keep_list_ops(doc: dict[str, Any], path: Path, scored: list[str], report_path: Path) -> None:
    """Every op of the keep-list must be one the sensitivity report scored (before any model loads)."""
    known = set(scored)
    for i, op in enumerate(doc["ops"]):
        if op["module"] not in known:
            raise InputError(
                f"{path}: ops[{i}].module {op['module']!r} is not an op {report_path} scored (a keep-list "
                "of another model or report? rerun the fallback_list stage)"
            )
