"""ONNX Runtime sessions and graph helpers the ``ort_qdq`` target builds on (:mod:`.onnx_runtime`,
whose docstring says what the export and ORT do), and the plain fp32 export of one batch: what a
user's own ``torch.onnx.export`` of the HF model gives (the node names ``fallback.onnx_model``
resolves, the ``ort_qdq`` scheme's tests). That export freezes the batch's layout (the image grid
and the rope positions are computed in Python), so :func:`signature` names a layout; the target
exports the serving graph of :mod:`.onnx_serving` instead, which takes any."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fallback.exports import node_module
from .base import Batch

OP_TYPES = ["MatMul", "Gemm", "Conv"]
OPSET = 17
FP32_FILE = "model_fp32.onnx"
PROTOBUF_LIMIT = 2**31  # bytes: protobuf's limit on one serialized graph
# external data from here: a margin under the limit for what the exporter adds to the parameters
# (constant-folded copies, e.g. the transposed weight of a tied lm_head)
LARGE = PROTOBUF_LIMIT * 3 // 4


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
