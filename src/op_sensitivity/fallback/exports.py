"""Exports of a fallback list in each quantizer's own format (chosen ops only).

* INC: ``op_name_dict`` keeping each op fp32 for weight and activation; load with
  ``PostTrainingQuantConfig(op_name_dict=json.load(f))``. Keys are INC's op names (as INC
  reported them, ``.module`` suffix included where INC wrapped the module).
* NVIDIA ModelOpt (0.47, list-format ``quant_cfg``): ``{"quant_cfg": [{"quantizer_name":
  "<module>.*", "enable": False}, ...], "stock_config_disables": ..., "notes": ...}`` - each entry
  disables one module's weight/input/output quantizers; append them after a stock config's entries
  (the last matching entry wins), e.g. ``cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG);
  cfg["quant_cfg"] = [*cfg["quant_cfg"], *frag["quant_cfg"]]``. ``stock_config_disables`` lists
  what ``INT8_DEFAULT_CFG`` already leaves unquantized (the vision tower, ``lm_head``...).
* ONNX Runtime ``quantize_static(nodes_to_exclude=...)``: node names depend on the export; with
  ``torch.onnx.export`` (TorchScript exporter) module ``model.language_model.layers.0.mlp.up_proj``
  becomes nodes named ``/model/language_model/layers.0/mlp/up_proj/<OpType>`` (``ORT_RULE``).
  Without an ``.onnx`` file we emit the module names, the rule and the node-name prefixes; with one
  (``fallback.onnx_model``: the file, or a directory holding it) we map every node of the graph back
  to its module (:func:`node_module`) with the ``onnx`` package. That graph must be such an export
  of this whole model: one with no node of any op of the model (another network, another
  exporter's names) is an error, and so is a kept module with no node in it (``nodes_to_exclude``
  would miss it and ONNX Runtime quantize it); ``unresolved_modules`` is therefore always empty.
* llm-compressor / compressed-tensors: an ``ignore`` list of module names; a ``re:`` pattern only
  where a whole group (a tower, or one vision block / decoder layer) is chosen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..engines.contract import FP32
from ..errors import InputError
from ..inventory import OpInfo, module_name

ORT_RULE = (
    "torch.onnx.export (TorchScript exporter, dynamo=False) names a node '/<scope>/.../<OpType>' with one "
    "scope per module whose forward ran, each named by its last attribute plus trailing indices: a "
    "ModuleList never runs, so module 'model.language_model.layers.0.mlp.up_proj' gives "
    "'/model/language_model/layers.0/mlp/up_proj/MatMul'; a Sequential runs, so 'model.visual.merger.mlp.0' "
    "gives '/model/visual/merger/mlp/mlp.0/Gemm'. node_name_prefixes assume ModuleLists; with the .onnx "
    "given, every node is mapped back to its module from its scopes (both cases), or, outside every op's "
    "scope, from the weight it reads by name (embed_tokens, called from the outer model: "
    "'/model/embed_tokens/Gather' reads 'model.language_model.embed_tokens.weight')"
)


def inc_op_name_dict(modules: Iterable[str]) -> dict[str, Any]:
    """INC keeps these modules fp32 whatever INC calls them.

    INC compiles each key as a regular expression and full-matches it against its op names, and
    names a module ``<path>.module`` where its sub-graph tracing wrapped it (which modules depends
    on the trace, not on the model alone), so each key matches the path with or without that
    suffix.
    """
    return {inc_pattern(m): {k: dict(v) for k, v in FP32.items()} for m in modules}


def inc_pattern(module: str) -> str:
    return re.escape(module_name(module)) + r"(?:\.module)?"


# What nvidia-modelopt 0.47's INT8_DEFAULT_CFG disables after enabling every "*weight_quantizer" and
# "*input_quantizer" (modelopt_recipes/configs/ptq/units/default_disabled_quantizers.yaml):
# quantizer-name globs, then parent module classes. tests/fallback/test_modelopt.py checks both
# against the installed modelopt.
MODELOPT_STOCK_DISABLED_NAMES = (
    "*block_sparse_moe.gate*",
    "*linear_attn.conv1d*",
    "*self_attention.conv1d*",
    "*linear_attn.in_proj_a*",
    "*linear_attn.in_proj_b*",
    "*lm_head*",
    "*mixer.conv1d*",
    "*mlp.gate.*",
    "*mlp.shared_expert_gate.*",
    "*output_layer*",
    "*proj_out.*",
    "*router*",
    "mtp.*",
    "output.*",
    "*embed_vision*",
    "*vision_tower*",
    "*visual*",
    "*vision_model*",
    "*multi_modal_projector*",
)
MODELOPT_STOCK_DISABLED_CLASSES = (
    "nn.BatchNorm1d",
    "nn.BatchNorm2d",
    "nn.BatchNorm3d",
    "nn.LeakyReLU",
    "nn.Embedding",
)
MODELOPT_NOTES = (
    "nvidia-modelopt>=0.47 quant_cfg entries. ModelOpt applies a config's quant_cfg list in order and, "
    "for each quantizer, the last entry whose quantizer_name glob (fnmatch) matches its full name wins, "
    "so append these after the stock entries: cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG); "
    "cfg['quant_cfg'] = [*cfg['quant_cfg'], *export['quant_cfg']] (placed before them, the stock "
    "'*weight_quantizer'/'*input_quantizer' entries would re-enable them). '<module>.*' matches that "
    "module's weight/input/output quantizers only: no leading '*', so 'lm_head.*' leaves "
    "'lm_head_extra.*' and 'x.lm_head.*' alone, and the '.' keeps 'layers.1.*' off 'layers.11.*'. "
    "Names are those of the whole Qwen2_5_VLForConditionalGeneration passed to mtq.quantize, as in "
    "fallback_ops.json (quantizing a submodule or a wrapper changes the prefix). "
    "The stock INT8_DEFAULT_CFG already disables, on its own, every quantizer matching "
    "stock_config_disables.quantizer_name_patterns (for Qwen2.5-VL: the whole vision tower via "
    "'*visual*', and lm_head) and those of modules of stock_config_disables.parent_classes (e.g. "
    "embed_tokens, an nn.Embedding); stock_config_disables.kept_modules names the kept modules whose "
    "names those patterns already match (their entries change nothing with the stock config but "
    "count with one that re-enables them)."
)


def _glob_literal(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _stock_disables(module: str) -> bool:
    from fnmatch import fnmatchcase  # ModelOpt's matcher (fnmatch; case-sensitive on POSIX)

    return all(
        any(fnmatchcase(f"{module}.{q}", p) for p in MODELOPT_STOCK_DISABLED_NAMES)
        for q in ("weight_quantizer", "input_quantizer")
    )


def modelopt_quant_cfg(modules: Iterable[str]) -> dict[str, Any]:
    """ModelOpt 0.47 ``quant_cfg`` entries disabling each module's quantizers, with what stock disables."""
    modules = list(modules)
    return {
        "quant_cfg": [{"quantizer_name": f"{_glob_literal(m)}.*", "enable": False} for m in modules],
        "stock_config_disables": {
            "config": "mtq.INT8_DEFAULT_CFG (nvidia-modelopt 0.47)",
            "quantizer_name_patterns": list(MODELOPT_STOCK_DISABLED_NAMES),
            "parent_classes": list(MODELOPT_STOCK_DISABLED_CLASSES),
            "kept_modules": [m for m in modules if _stock_disables(m)],
        },
        "notes": MODELOPT_NOTES,
    }


def ort_prefix(module: str) -> str:
    """The exporter's node-name prefix of ``module`` when its indexed containers are ModuleLists."""
    atoms: list[str] = []
    for part in module.split("."):
        if part.isdigit() and atoms:
            atoms[-1] = f"{atoms[-1]}.{part}"
        else:
            atoms.append(part)
    return "/" + "/".join(atoms) + "/"


def node_module(node_name: str) -> str:
    """The module path a TorchScript-exported node belongs to, from its scopes (see ``ORT_RULE``).

    A scope repeating the previous one's name with indices (a Sequential's child, ``mlp`` then
    ``mlp.0``) adds only the indices.
    """
    path: list[str] = []
    for scope in node_name.split("/")[1:-1]:
        parts = scope.split(".")
        if len(parts) > 1 and path and path[-1] == parts[0] and all(p.isdigit() for p in parts[1:]):
            parts = parts[1:]
        path.extend(parts)
    return ".".join(path)


def onnx_graph(path: Path, where: str) -> Path | None:
    """The graph ``fallback.onnx_model`` names: the file itself, or the only ``.onnx`` in a directory.

    The param is always a path (so ``dvc.yaml`` can always depend on it); a directory without a
    graph means "no export to resolve names from".
    """
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"{where}: {path} not found (expected an .onnx file or a directory holding one)")
    graphs = sorted(path.glob("*.onnx"))
    if len(graphs) > 1:
        names = ", ".join(g.name for g in graphs)
        raise InputError(
            f"{where}: {path} holds {len(graphs)} .onnx files ({names}); point it at one of them"
        )
    return graphs[0] if graphs else None


def load_onnx(path: Path, where: str) -> Any:
    """The ``onnx.ModelProto`` at ``path`` (its graph only: external weight data is not read)."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends for a bad file
        raise InputError(f"{where}: {path}: not a loadable ONNX model ({e})") from e


def ort_nodes_to_exclude(
    modules: list[str],
    onnx_path: Path | None,
    where: str = "fallback.onnx_model",
    model_ops: list[str] | None = None,
) -> dict[str, Any]:
    """ONNX Runtime's export of the keep-list ``modules``; with a graph, its nodes of those modules.

    ``where`` names the param in errors; ``model_ops``: every op of the model (the inventory), to
    refuse a graph none of whose nodes belongs to one (checked even for an empty keep-list)."""
    doc: dict[str, Any] = {
        "module_names": modules,
        "mapping_rule": ORT_RULE,
        "node_name_prefixes": [ort_prefix(m) for m in modules],
        "onnx_model": None if onnx_path is None else str(onnx_path),
        "nodes_to_exclude": None,
    }
    if onnx_path is None:
        return doc
    graph = load_onnx(onnx_path, where).graph
    ops = {*modules, *(model_ops or [])}
    owners = [(n.name, node_owner(n.name, n.input, ops)) for n in graph.node]
    if model_ops:
        _check_graph_of_model(owners, model_ops, onnx_path, where)
    resolved, unresolved = [], []
    for m in modules:
        hits = [n for n, owner in owners if owner == m or owner.startswith(m + ".")]
        resolved.extend(hits)
        if not hits:
            unresolved.append(m)
    if unresolved:
        raise InputError(
            f"{where}: {onnx_path}: {len(unresolved)} of the {len(modules)} kept modules have no node in "
            f"the graph: {_some(unresolved)} (ONNX Runtime would quantize them; expected a torch.onnx.export "
            f"(TorchScript exporter) of this whole model, e.g. nodes named {ort_prefix(unresolved[0])}...)"
        )
    doc["nodes_to_exclude"] = resolved
    doc["unresolved_modules"] = unresolved
    return doc


def _op_of(owner: str, ops: set[str]) -> str | None:
    """The op ``owner`` is or lies under (None: none of ``ops``)."""
    parts = owner.split(".")
    return next((p for i in range(len(parts), 0, -1) if (p := ".".join(parts[:i])) in ops), None)


def node_owner(node_name: str, inputs: Iterable[str], ops: set[str]) -> str:
    """The module a node belongs to: its scopes (:func:`node_module`) where they name one of ``ops``
    or a module under one, else the op whose weight it reads by name (the exporter keeps parameter
    names for initializers): Qwen2.5-VL calls ``embed_tokens`` from the outer model, so its Gather
    is scoped ``/model/embed_tokens/`` but reads ``model.language_model.embed_tokens.weight``."""
    owner = node_module(node_name)
    if _op_of(owner, ops) is not None:
        return owner
    for name in inputs:
        if name.endswith(".weight") and name[: -len(".weight")] in ops:
            return name[: -len(".weight")]
    return owner


def _some(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(repr(i) for i in items[:n]) + more


def _check_graph_of_model(
    owners: list[tuple[str, str]], model_ops: list[str], onnx_path: Path, where: str
) -> None:
    """Some node of the graph belongs to an op of the model (the op's scope or one under it)."""
    ops = set(model_ops)
    if not any(_op_of(owner, ops) is not None for _, owner in owners):
        names = [n for n, _ in owners]
        raise InputError(
            f"{where}: {onnx_path}: not an export of this model: none of its {len(names)} nodes belongs to "
            f"one of the model's {len(ops)} ops (nodes like {_some(names, 3) or 'none'}; expected a "
            "torch.onnx.export (TorchScript exporter) of this whole model, nodes named like "
            f"{ort_prefix(model_ops[0])}<OpType>)"
        )


def _groups(inventory: list[OpInfo]) -> dict[str, list[str]]:
    """Candidate groups: each tower, and each vision block / decoder layer."""
    groups: dict[str, list[str]] = {}
    for op in inventory:
        groups.setdefault(f"tower:{op.tower}", []).append(op.name)
        m = re.match(r"(.*\.(?:layers|blocks)\.\d+)\.", op.name)
        if m:
            groups.setdefault(m.group(1), []).append(op.name)
    return groups


def llmcompressor_ignore(modules: list[str], inventory: list[OpInfo]) -> list[str]:
    """Module names, collapsing fully chosen groups into one ``re:`` pattern (largest groups first)."""
    chosen = set(modules)
    covered: set[str] = set()
    patterns = []
    for key, members in sorted(_groups(inventory).items(), key=lambda kv: -len(kv[1])):
        if len(members) < 2 or not set(members) <= chosen or set(members) <= covered:
            continue
        if key.startswith("tower:"):
            prefix = _common_prefix(members)
            if not prefix or any(o.name.startswith(prefix) and o.name not in chosen for o in inventory):
                continue
        else:
            prefix = key + "."
        patterns.append("re:" + re.escape(prefix) + ".*")
        covered |= set(members)
    return patterns + [m for m in modules if m not in covered]


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for tokens in zip(*parts, strict=False):
        if len(set(tokens)) != 1:
            break
        common.append(tokens[0])
    return ".".join(common) + "." if common else ""


def llmcompressor_recipe(ignore: list[str]) -> dict[str, Any]:
    """A W8A8 recipe fragment llm-compressor loads as YAML; ``ignore`` is what this pipeline decides."""
    return {
        "quant_stage": {
            "quant_modifiers": {
                "QuantizationModifier": {"targets": ["Linear"], "scheme": "W8A8", "ignore": ignore}
            }
        }
    }
