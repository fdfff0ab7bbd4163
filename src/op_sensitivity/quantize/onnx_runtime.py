"""An ONNX Runtime QDQ model of a keep-list (``quantize_static``), and ORT running it.

Why: the native engine *predicts* what a keep-list costs under ``ort_qdq``; this writes the model a
user gets from ONNX Runtime's own tools (``torch.onnx.export``, then ``quantize_static`` with the
list's complement as ``nodes_to_quantize`` and the kept modules' nodes as ``nodes_to_exclude``)
and runs it in ``onnxruntime.InferenceSession`` (CPUExecutionProvider, default graph
optimizations), so that the prediction can be checked where it is deployed.

What the export and ORT do (onnxruntime 1.32, torch 2.13; facts, the tests check them):

* Export: ``torch.onnx.export(..., dynamo=False)`` (the dynamo exporter needs ``onnxscript``).
  Tracing freezes whatever Python computes from tensor values: the vision tower's grid
  (``image_grid_thw.tolist()``, the window indices), so ``image_grid_thw`` is no graph input, and
  the text side's 3-D rope positions (``get_rope_index`` walks ``attention_mask`` and the
  image-token layout of ``input_ids`` in Python over ``.tolist()``). So one graph holds for one
  batch *layout*, not only one set of shapes: :func:`signature` keys a graph on every input's shape
  and dtype and on the values of every integer input (``input_ids``, ``attention_mask``,
  ``image_grid_thw``); a float input (``pixel_values``) flows through the graph. (On the tiny
  random model, masking one more token of a batch run through a graph exported before moved the
  logits by under 1e-7 against torch: that model cannot show the frozen positions; the rule
  follows the code, not a measurement.)
* Node names: the TorchScript exporter names a node ``/<scope>/.../<OpType>[_k]`` where each scope
  is a module *whose forward ran*, named by its last attribute atom extended over trailing numeric
  atoms. A ``ModuleList`` never runs, so ``model.language_model.layers.0.mlp.up_proj`` is
  ``/model/language_model/layers.0/mlp/up_proj/``, and a ``Sequential`` does, so
  ``model.visual.merger.mlp.0`` is ``/model/visual/merger/mlp/mlp.0/`` (``fallback.exports.node_module``
  reads the module back from a node name).
* The exporter stores equal initializers once and feeds the copies through ``Identity`` nodes;
  ``quantize_static`` leaves a Gemm bias that is not an initializer float, so they are inlined
  (:func:`inline_constant_identities`).
* Calibration: the activation ranges are ORT's ``MinMaxCalibrater``'s (``create_calibrator``, as
  ``quantize_static`` runs it), over every calibration batch: one fp32 export per batch layout,
  one calibrator run on that layout's batches, the ranges merged as the calibrator merges batches
  (min of minima, max of maxima). Ranges are carried between exports by node and role (a Linear's
  node name is its module's scope, the same in every export; the tensors between nodes are named
  by a counter per scope that moves with the traced per-window attention loop: on the embedded
  default the test split's layout names ``/model/visual/blocks.1/attn/Reshape_7_output_0`` what
  the calibration layout names otherwise, :func:`node_roles`). The merged ranges are written as
  ``quantize_static``'s ``calibration_cache_path`` JSON (onnxruntime 1.32) of the first layout's
  export and, by node and role, as ``ranges_by_node.json``; every layout is quantized from the same
  ranges without calibrating again.
* ``model.onnx`` is the QDQ graph at the first calibration batch's layout (what a layout the
  runtime sees first is cannot be known when writing). :meth:`OrtQdq.load` runs it for a batch of
  that layout and, for any other, exports again and quantizes with the stored ranges mapped onto
  that export's tensor names (the step a user takes for a new input layout), one graph per layout.
* ORT's CPU session fuses DequantizeLinear -> MatMul/Gemm -> QuantizeLinear groups into int8
  kernels (QLinearMatMul, QGemm, QLinearConv, MatMulInteger...) where it can; the rest runs as
  DequantizeLinear -> float op -> QuantizeLinear (the float value of the QDQ arithmetic). The
  runtime notes count both, read from the optimized graph the session writes.

Size: a graph whose parameters pass protobuf's 2 GB limit is written with external data (one
``<file>.data`` beside it): the exporter does so on its own above 2 GB, then :func:`export_onnx`,
the calibrator and ``quantize_static`` (``use_external_data_format``) follow :func:`is_large`. At
the 3B size (about 3.75 G parameters) the fp32 export is about 15 GB on disk (4 bytes a parameter;
more where the exporter folds a transposed copy of a tied ``lm_head`` weight into a new
initializer), the QDQ model about a quarter of the quantized weights' fp32 bytes plus the float
ones. Writing holds the float32 torch model (about 15 GB) while the tracer builds the graph, then
``onnx.load`` / ``quantize_static`` each hold a full copy of the graph's initializers; and every
new input layout at load time repeats the export and quantization. None of this was run at 3B
here: the numbers are arithmetic from the parameter count, not measurements.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_dir
from ..errors import InputError
from ..fallback.exports import node_module
from ..params import TARGET_SCHEMES
from .base import Batch, Inputs, Runtime, Target, dir_bytes

log = logging.getLogger(__name__)

EXTRA = "pip install -e '.[ort]'"
OP_TYPES = ["MatMul", "Gemm", "Conv"]
SCORED_TYPES = (torch.nn.Linear, torch.nn.Conv3d)  # the ort_qdq scheme's op_types (schemes.ort)
OPSET = 17
MODEL_FILE = "model.onnx"
FP32_FILE = "model_fp32.onnx"
CACHE_FILE = "calibration_ranges.json"
EXPORT_FILE = "export.json"
ROLES_FILE = "ranges_by_node.json"  # the same ranges by node and role, for another layout's export
PROTOBUF_LIMIT = 2**31  # bytes: protobuf's limit on one serialized graph
# external data from here: a margin under the limit for what the exporter adds to the parameters
# (constant-folded copies, e.g. the transposed weight of a tied lm_head)
LARGE = PROTOBUF_LIMIT * 3 // 4
# ORT's int8 kernels for a fused QDQ group (the optimized graph's op types)
INT8_KERNELS = (
    "QLinearMatMul",
    "QGemm",
    "QLinearConv",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "ConvInteger",
)


def param_bytes(model: torch.nn.Module) -> int:
    """The float32 bytes of the model's parameters and buffers (what the export stores, about)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * 4 for t in tensors.values())


def is_large(model: torch.nn.Module) -> bool:
    """The export may pass protobuf's 2 GB: initializers go to external data."""
    return param_bytes(model) >= LARGE


def save_onnx(proto: Any, path: Path, large: bool) -> None:
    """``proto`` at ``path``; its initializers in one ``<name>.data`` beside it when ``large``."""
    import onnx

    if large:
        onnx.save(proto, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save(proto, str(path))


def export_onnx(model: torch.nn.Module, batch: Batch, path: Path, large: bool | None = None) -> list[str]:
    """``model(**batch).logits`` as an ONNX graph at ``path`` (output ``logits``); its input names.

    The model itself is exported (its forward swapped for a positional one for the call), so the
    node names carry the module paths from the root, exactly as a user exporting the HF model gets.
    ``large`` (default: :func:`is_large`): write the initializers as external data.
    """
    import onnx

    names = list(batch)
    forward = type(model).forward
    large = is_large(model) if large is None else large

    def positional(*args: torch.Tensor) -> torch.Tensor:
        return forward(model, **dict(zip(names, args, strict=True)), use_cache=False).logits

    model.forward = positional
    raw = Path(
        tempfile.mkdtemp(prefix=".export-", dir=path.parent)
    )  # the exporter's files, whatever they are
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                tuple(batch[k] for k in names),
                str(raw / path.name),
                input_names=names,
                output_names=["logits"],
                opset_version=OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(raw / path.name))  # above 2 GB the exporter wrote external data: read in
        inline_constant_identities(proto)
        save_onnx(proto, path, large)
    finally:
        del model.forward
        shutil.rmtree(raw, ignore_errors=True)
    return [i.name for i in proto.graph.input]


def inline_constant_identities(proto: Any) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer; how many there were.

    The TorchScript exporter stores equal initializers once and feeds the others through an
    Identity (the tiny model's all-zero biases), and ``quantize_static`` leaves a Gemm bias that is
    not an initializer float ("Bias of Gemm node ... is not constant"). Inlined, every Gemm bias is
    quantized the way a distinct one would be.
    """
    import onnx

    inits = {i.name: i for i in proto.graph.initializer}
    keep, count = [], 0
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            proto.graph.initializer.append(copy)
            count += 1
        else:
            keep.append(node)
    if count:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return count


def module_nodes(graph: Any, modules: Iterable[str]) -> dict[str, list[str]]:
    """Each of ``modules``' MatMul / Gemm / Conv nodes, by the module its name scopes it under
    (``fallback.exports.node_module``, the rule a user's ``nodes_to_exclude`` export follows)."""
    wanted = {m: [] for m in modules}
    for n in graph.node:
        if n.op_type in OP_TYPES and node_module(n.name) in wanted:
            wanted[node_module(n.name)].append(n.name)
    return wanted


def session(path: Path, optimized: bool = True, threads: int = 1, optimized_model: Path | None = None) -> Any:
    """An ORT CPU session on ``path``. ``optimized=False``: graph optimizations off (the literal
    QuantizeLinear / DequantizeLinear float graph). ``threads`` 0: ORT's default (every core).
    ``optimized_model``: where ORT writes the graph it runs (its fused kernels, read back)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_model is not None:
        opts.optimized_model_filepath = str(optimized_model)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{optimized_model.name}.data"
        )
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(PROTOBUF_LIMIT // 4)
        )
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def feeds_reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    """A ``CalibrationDataReader`` over ``feeds`` (ORT's calibrator pulls them one by one)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

    return Feeds()


def feed(batch: Batch, names: list[str]) -> dict[str, np.ndarray]:
    """The graph's inputs from a model batch: float inputs as float32 (the graph's dtype)."""
    return {
        k: (batch[k].detach().cpu().float() if batch[k].is_floating_point() else batch[k].cpu()).numpy()
        for k in names
    }


def signature(batch: Batch) -> str:
    """What one exported graph holds for: every input's name, dtype and shape, and the values of
    the integer inputs (the traced Python reads them: rope positions from ``attention_mask`` and the
    image-token layout, the grid from ``image_grid_thw``). Two batches with the same signature run
    the same graph; the text's token ids are included too, erring on the side of a new export."""
    h = hashlib.sha256()
    for k in sorted(batch):
        t = batch[k].detach().cpu()
        h.update(f"{k}:{t.dtype if not t.is_floating_point() else 'float'}:{list(t.shape)};".encode())
        if not t.is_floating_point():
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def shapes(batch: Batch) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in batch.items()}


def _calibrate_one(fp32: Path, feeds: list[dict[str, np.ndarray]], workdir: Path, large: bool) -> Any:
    """ORT's MinMax ranges of ``fp32``'s MatMul/Gemm/Conv tensors over ``feeds`` (``TensorsData``),
    by the calibrator ``quantize_static`` itself builds."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    calibrator = create_calibrator(
        fp32,
        OP_TYPES,
        augmented_model_path=str(workdir / "augmented_model.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=large,
        providers=["CPUExecutionProvider"],
    )
    calibrator.collect_data(feeds_reader(feeds))
    return calibrator.compute_data()


Roles = dict[str, tuple[str, str]]  # node name -> (its activation input, its output): tensor names


def node_roles(graph: Any, modules: Iterable[str]) -> Roles:
    """The activation input and output tensor of each of ``modules``' MatMul / Gemm / Conv nodes.

    Why by node: a node's name is its module's scope (``/model/visual/blocks.1/attn/proj/Gemm``),
    the same in every export, while the tensors between them are named by a counter per scope
    (``/model/visual/blocks.1/attn/Reshape_7_output_0``) that moves with the traced loop's length
    (one attention call per window: another image grid, another count). Ranges are carried from
    one export to another by node and role, never by tensor name."""
    wanted = {n for nodes in module_nodes(graph, modules).values() for n in nodes}  # one pass over the graph
    return {node.name: (node.input[0], node.output[0]) for node in graph.node if node.name in wanted}


def ranges_by_role(data: Any, roles: Roles) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """``TensorsData`` read as ``{(node, "input" | "output"): (lowest, highest)}``."""
    out = {}
    for node, tensors in roles.items():
        for role, tensor in zip(("input", "output"), tensors, strict=True):
            low, high = data[tensor].range_value
            out[(node, role)] = (np.asarray(low), np.asarray(high))
    return out


def merge_roles(per_layout: list[dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]) -> dict:
    """One range per node and role over every layout, as the calibrator merges batches
    (moving_average off: min of minima, max of maxima). Every layout's export must have the same
    nodes (a node only some have would get a range from part of the data)."""
    keys = [set(r) for r in per_layout]
    if any(k != keys[0] for k in keys):
        odd = sorted({n for n, _ in set.union(*keys) - set.intersection(*keys)})
        raise RuntimeError(
            f"the exports of the calibration batches' layouts have different Linear/Conv nodes ({odd[:5]}); "
            "their ranges cannot be merged into one cache"
        )
    return {
        k: (
            np.minimum.reduce([r[k][0] for r in per_layout]),
            np.maximum.reduce([r[k][1] for r in per_layout]),
        )
        for k in per_layout[0]
    }


def cache_for(merged: dict, roles: Roles) -> Any:
    """The ranges as ``quantize_static``'s calibration cache of one export (its tensor names). A
    tensor two nodes share (q/k/v's input) gets the same range from each."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    data = {}
    for node, tensors in roles.items():
        if (node, "input") not in merged:
            raise RuntimeError(f"no calibrated range for node {node} (not in the calibration exports)")
        for role, tensor in zip(("input", "output"), tensors, strict=True):
            low, high = merged[(node, role)]
            data[tensor] = TensorData(lowest=low, highest=high)
    return TensorsData(CalibrationMethod.MinMax, data)


def calibrate(
    model: torch.nn.Module, batches: list[Batch], modules: list[str], workdir: Path, cache: Path, large: bool
) -> tuple[Path, list[str], Batch, dict]:
    """Write ``cache`` (``quantize_static``'s calibration cache of the first layout's export) from
    every calibration batch, merged by node and role (:func:`node_roles`).

    Returns the fp32 export of the first batch's layout (kept: ``model.onnx`` is quantized from it),
    its input names, that batch, and the merged ranges by node and role (stored beside, so that
    another layout's export gets its own cache). Each other layout's export is removed once calibrated.
    """
    import onnx
    from onnxruntime.quantization.calibrate import save_tensors_data

    layouts: dict[str, list[Batch]] = {}
    for b in batches:
        layouts.setdefault(signature(b), []).append(b)
    per_layout, first = [], None
    for i, (key, group) in enumerate(layouts.items()):
        where = workdir / f"calibrate-{i}-{key}"
        where.mkdir(parents=True)
        fp32 = where / FP32_FILE
        names = export_onnx(model, group[0], fp32, large)
        roles = node_roles(onnx.load(str(fp32), load_external_data=False).graph, modules)
        data = _calibrate_one(fp32, [feed(b, names) for b in group], where, large)
        per_layout.append(ranges_by_role(data, roles))
        (where / "augmented_model.onnx").unlink(missing_ok=True)
        if first is None:
            first = (fp32, names, group[0], roles)
        else:
            shutil.rmtree(where)
    assert first is not None
    merged = merge_roles(per_layout)
    save_tensors_data(cache_for(merged, first[3]), cache)
    return first[0], first[1], first[2], merged


def save_roles(merged: dict, path: Path) -> None:
    rows = [
        {"node": n, "role": r, "lowest": low.tolist(), "highest": high.tolist()}
        for (n, r), (low, high) in sorted(merged.items())
    ]
    path.write_text(json.dumps(rows, indent=1) + "\n")


def read_roles(path: Path) -> dict:
    try:
        rows = json.loads(path.read_text())
        return {
            (r["node"], r["role"]): (
                np.asarray(r["lowest"], np.float32),
                np.asarray(r["highest"], np.float32),
            )
            for r in rows
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not readable ranges by node and role ({e})") from e


def _nodes(graph: Any, quantize: list[str], kept: list[str], where: str) -> tuple[list[str], list[str]]:
    """``nodes_to_quantize`` (the nodes of ``quantize``) and ``nodes_to_exclude`` (those of the kept
    scored modules); a quantized module without a node is refused (ORT would leave it float)."""
    q = module_nodes(graph, quantize)
    missing = [m for m, nodes in q.items() if not nodes]
    if missing:
        raise InputError(
            f"{where}: {len(missing)} modules to quantize have no {'/'.join(OP_TYPES)} node in the "
            f"export: {missing[:5]} (expected nodes named like "
            "/model/language_model/layers.0/mlp/up_proj/MatMul)"
        )
    x = module_nodes(graph, kept)
    return [n for m in quantize for n in q[m]], [n for m in kept for n in x[m]]


def _check_cached(graph: Any, to_quantize: list[str], cache: Path) -> None:
    """Every tensor the quantized nodes read or write has a range in ``cache`` (a tensor named
    otherwise in this layout's export would be left unquantized or fail deep inside ORT)."""
    ranges = json.loads(cache.read_text())
    known = set(ranges.get("data", ranges))
    inits = {i.name for i in graph.initializer}
    chosen = set(to_quantize)
    tensors = {
        t for n in graph.node if n.name in chosen for t in (n.input[0], *n.output) if t and t not in inits
    }
    missing = sorted(tensors - known)
    if missing:
        raise RuntimeError(
            f"{cache}: no range for {len(missing)} tensors this layout's export quantizes ({missing[:5]}); "
            "the export names tensors differently from the calibration exports"
        )


def quantize_graph(
    fp32: Path, out: Path, quantize: list[str], kept: list[str], cache: Path, large: bool
) -> dict[str, Any]:
    """``quantize_static`` on ``fp32`` (QDQ, ORT's defaults otherwise) with the ranges in ``cache``:
    exactly ``quantize``'s nodes quantized, ``kept``'s excluded. Returns the node lists."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    graph = onnx.load(str(fp32), load_external_data=False).graph
    to_quantize, to_exclude = _nodes(graph, quantize, kept, str(fp32))
    _check_cached(graph, to_quantize, cache)
    work_cache = out.parent / f".{CACHE_FILE}"  # ORT may rewrite a cache; the stored one stays as is
    shutil.copyfile(cache, work_cache)
    try:
        quantize_static(
            str(fp32),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=OP_TYPES,
            nodes_to_quantize=to_quantize,
            nodes_to_exclude=to_exclude,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=large,
            calibration_cache_path=str(work_cache),
        )
    finally:
        work_cache.unlink(missing_ok=True)
    return {"nodes_to_quantize": to_quantize, "nodes_to_exclude": to_exclude}


def _producers(graph: Any) -> dict[str, Any]:
    return {o: n for n in graph.node for o in n.output}


def quantized_nodes(graph: Any) -> list[str]:
    """The MatMul / Gemm / Conv nodes whose weight is int8: input 1 is the output of a
    DequantizeLinear of an int8 initializer, and its activation input comes through a
    DequantizeLinear too (the QDQ pair), read from the graph alone."""
    import onnx

    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    made_by = _producers(graph)
    out = []
    for n in graph.node:
        if n.op_type not in OP_TYPES or len(n.input) < 2:
            continue
        w, x = made_by.get(n.input[1]), made_by.get(n.input[0])
        if (
            w is not None
            and w.op_type == "DequantizeLinear"
            and w.input[0] in int8
            and x is not None
            and x.op_type == "DequantizeLinear"
        ):
            out.append(n.name)
    return out


def fusion(optimized: Path) -> dict[str, int]:
    """What ORT's session made of the QDQ groups, from the optimized graph it wrote: int8 kernels
    by op type, and ``dq_float_q``: float MatMul/Gemm/Conv nodes still fed by an int8 weight's
    DequantizeLinear (the QDQ arithmetic run in float)."""
    import onnx

    graph = onnx.load(str(optimized), load_external_data=False).graph
    counts = Counter(n.op_type for n in graph.node if n.op_type in INT8_KERNELS)
    made_by = _producers(graph)
    float_qdq = sum(
        1
        for n in graph.node
        if n.op_type in OP_TYPES
        and len(n.input) > 1
        and (p := made_by.get(n.input[1])) is not None
        and p.op_type == "DequantizeLinear"
    )
    return {**dict(sorted(counts.items())), "dq_float_q": float_qdq}


def kept_modules(model: torch.nn.Module, quantize: list[str], where: str) -> list[str]:
    """The scheme's ops (Linear, Conv3d) that ``quantize`` leaves in high precision, in model order;
    a name in ``quantize`` that is no such op is refused."""
    ops = [n for n, m in model.named_modules() if isinstance(m, SCORED_TYPES)]
    unknown = sorted(set(quantize) - set(ops))
    if unknown:
        raise InputError(f"{where}: not Linear/Conv3d modules of the model: {unknown[:5]}")
    return [n for n in ops if n not in set(quantize)]


def load_fp32(model_dir: Path) -> torch.nn.Module:
    """The model as the export takes it: float32 (``quantize_static`` quantizes float32 weights; a
    bf16 checkpoint is upcast, exactly)."""
    from ..model.source import load_model_dir

    model, _, _ = load_model_dir(model_dir)
    return model.float() if next(model.parameters()).dtype != torch.float32 else model


class OrtQdq(Target):
    """``ort_qdq``: the QDQ ONNX model ``quantize_static`` writes from the ``ort_qdq`` keep-list,
    measured in ONNX Runtime (CPU)."""

    name = "ort_qdq"
    scheme = TARGET_SCHEMES["ort_qdq"]
    format = "onnx-qdq"
    requires = ("onnx", "onnxruntime")
    extra = EXTRA
    bar = 0.01
    gap = (
        "ORT's fused int8 kernels (QGemm, QLinearMatMul, QLinearConv) accumulate in int32 and requantize "
        "their output, where the prediction rounds a float32 product: an output at a rounding boundary "
        "lands one code apart (6e-6 relative on the small model, ~0.7% of the embedded default's tiny KL)"
    )

    def write(self, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
        if not inputs.calibration:
            raise InputError(f"{inputs.model_dir}: no calibration batches (the cache needs at least one)")
        start = time.perf_counter()
        model = load_fp32(inputs.model_dir)
        kept = kept_modules(model, inputs.quantize, f"{inputs.model_dir}: quantize")
        large = is_large(model)
        work = inputs.workspace / "ort_write"
        work.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out_dir) as tmp:
            cache = tmp / CACHE_FILE
            modules = [*inputs.quantize, *kept]
            fp32, names, first, merged = calibrate(model, inputs.calibration, modules, work, cache, large)
            save_roles(merged, tmp / ROLES_FILE)
            nodes = quantize_graph(fp32, tmp / MODEL_FILE, inputs.quantize, kept, cache, large)
            shutil.rmtree(fp32.parent)
            doc = {
                "inputs": {k: shapes(first)[k] for k in names},
                "signature": signature(first),
                "batch_shapes": shapes(first),
                "opset": OPSET,
                "op_types": OP_TYPES,
                "quantize": list(inputs.quantize),
                "kept": kept,
                **nodes,
                "external_data": large,
                "calibration_batches": len(inputs.calibration),
                "calibration_layouts": len({signature(b) for b in inputs.calibration}),
                "torch": torch.__version__,
                "onnx": version("onnx"),
                "onnxruntime": version("onnxruntime"),
            }
            (tmp / EXPORT_FILE).write_text(json.dumps(doc, indent=1) + "\n")
        return {
            "format": self.format,
            "external_data": large,
            "calibration_layouts": doc["calibration_layouts"],
            "bytes": dir_bytes(out_dir),
            "seconds": time.perf_counter() - start,
        }

    def quantized_in(self, out_dir: Path) -> set[str]:
        import onnx

        path = out_dir / MODEL_FILE
        if not path.is_file():
            raise InputError(f"{path}: not found (the ort_qdq artifact holds {MODEL_FILE})")
        graph = onnx.load(str(path), load_external_data=False).graph
        return {node_module(n) for n in quantized_nodes(graph)}

    def load(self, out_dir: Path, inputs: Inputs) -> Runtime:
        export = _read_export(out_dir)
        graphs = _Graphs(out_dir, export, inputs)
        first = graphs.fused[export["signature"]]
        return Runtime(
            # the graph the session loaded (each other layout's is checked against it when made)
            quantized=self.quantized_in(out_dir),
            forward=graphs.forward,
            loader=f"onnxruntime {version('onnxruntime')} InferenceSession (CPUExecutionProvider, "
            "ORT_ENABLE_ALL graph optimizations)",
            weights="int8 symmetric per-tensor initializers -> DequantizeLinear (quantize_static QDQ)",
            inputs=f"{graphs.activation_type} asymmetric per-tensor, static (MinMax ranges of the "
            "calibration split), one QuantizeLinear/DequantizeLinear pair per tensor shared by its readers",
            matmul=f"{MODEL_FILE}: {_describe(first)}",
            notes=graphs.notes,
            close=graphs.close,
        )


def _describe(counts: dict[str, int]) -> str:
    kernels = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "dq_float_q") or "no int8 kernel"
    return f"{kernels}; {counts['dq_float_q']} DequantizeLinear -> float MatMul/Gemm/Conv left"


def _read_export(out_dir: Path) -> dict[str, Any]:
    path = out_dir / EXPORT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable ort_qdq export record ({e})") from e
    missing = [k for k in ("signature", "inputs", "quantize", "kept", "external_data") if k not in doc]
    if missing:
        raise InputError(f"{path}: missing {missing}")
    return doc


class _Graphs:
    """One ORT session per input layout: the stored ``model.onnx`` for its own, a graph exported
    and quantized with the stored cache (in the workspace) for every other."""

    def __init__(self, out_dir: Path, export: dict[str, Any], inputs: Inputs):
        import onnx

        self.out_dir, self.export, self.inputs = out_dir, export, inputs
        self.work = inputs.workspace / "ort_load"
        self.work.mkdir(parents=True, exist_ok=True)
        self.model: torch.nn.Module | None = None  # loaded on the first new layout
        self.sessions: dict[str, tuple[Any, list[str]]] = {}
        self.fused: dict[str, dict[str, int]] = {}
        self.notes: list[str] = []
        key = export["signature"]
        self._open(key, out_dir / MODEL_FILE, list(export["inputs"]))
        graph = onnx.load(str(out_dir / MODEL_FILE), load_external_data=False).graph
        zps = {i.name: i.data_type for i in graph.initializer}
        types = {
            zps.get(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
        }
        names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
        self.activation_type = "/".join(sorted(names.get(t, str(t)) for t in types))
        self.notes.append(f"{MODEL_FILE} holds the layout of the first calibration batch")
        self.notes.append("other layouts: none seen yet")

    def _open(self, key: str, path: Path, names: list[str]) -> None:
        optimized = self.work / f"optimized-{key}.onnx"
        self.sessions[key] = (session(path, threads=0, optimized_model=optimized), names)
        self.fused[key] = fusion(optimized)
        for f in self.work.glob(f"optimized-{key}.onnx*"):
            f.unlink()

    def _new_layout(self, key: str, batch: Batch) -> None:
        """The user's step for an input layout the stored graph does not hold: export the fp32
        graph at it and quantize it with the stored ranges (no calibration run), carried over to
        this export's tensor names by node and role (``ranges_by_node.json``, :func:`node_roles`)."""
        if self.model is None:
            self.model = load_fp32(self.inputs.model_dir)
        where = self.work / key
        where.mkdir(parents=True, exist_ok=True)
        large = bool(self.export["external_data"])
        names = export_onnx(self.model, batch, where / FP32_FILE, large)
        import onnx
        from onnxruntime.quantization.calibrate import save_tensors_data

        modules = [*self.export["quantize"], *self.export["kept"]]
        roles = node_roles(onnx.load(str(where / FP32_FILE), load_external_data=False).graph, modules)
        cache = where / CACHE_FILE
        save_tensors_data(cache_for(read_roles(self.out_dir / ROLES_FILE), roles), cache)
        out = where / MODEL_FILE
        quantize_graph(where / FP32_FILE, out, self.export["quantize"], self.export["kept"], cache, large)

        got = {node_module(n) for n in quantized_nodes(onnx.load(str(out), load_external_data=False).graph)}
        if got != set(self.export["quantize"]):
            raise RuntimeError(
                f"{out}: quantize_static quantized {len(got)} modules, not the artifact's list"
            )
        for f in where.glob(f"{FP32_FILE}*"):
            f.unlink()
        self._open(key, out, names)
        others = [c for k, c in self.fused.items() if k != self.export["signature"]]
        total: Counter[str] = Counter()
        for c in others:
            total.update(c)
        self.notes[1] = (
            f"other layouts: {len(others)} exported and quantized with the stored ranges ({ROLES_FILE}) "
            f"at load time (summed): {_describe(dict(total))}"
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        key = signature(batch)
        if key not in self.sessions:
            self._new_layout(key, batch)
        sess, names = self.sessions[key]
        logits = sess.run(["logits"], feed(batch, names))[0]
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))

    def close(self) -> None:
        self.sessions.clear()
        self.model = None
