"""An ONNX Runtime QDQ model of a keep-list (``quantize_static``), and ORT serving it as stored.

Four modules: the serving graph and its per-batch inputs in :mod:`.onnx_serving`; sessions and the
plain fixed-layout export in :mod:`.onnx_export`; the activation ranges in :mod:`.onnx_ranges`; the
target (quantize, write, read back, load) here.

Why: the native engine *predicts* what a keep-list costs under ``ort_qdq``; this writes the model a
user gets from ONNX Runtime's own tools (``torch.onnx.export``, then ``quantize_static`` with the
list's complement as ``nodes_to_quantize`` and the kept modules' nodes as ``nodes_to_exclude``)
and runs the stored file in ``onnxruntime.InferenceSession`` (CPUExecutionProvider, default graph
optimizations) on every test batch, so that the prediction is checked where it is deployed.

What the export and ORT do (onnxruntime 1.32, torch 2.13, transformers 5.24; the tests check them):

* Export: the serving graph of :mod:`.onnx_serving` (``torch.onnx.export(..., dynamo=False)``,
  every axis dynamic; the image grid's and the token layout's integer tensors are inputs, computed
  per batch by :func:`.onnx_serving.graph_inputs` with transformers' own weightless functions).
  One ``model.onnx`` serves every batch of the test split, whatever its shapes and grids.
* Node names: the TorchScript exporter names a node ``/<scope>/.../<OpType>[_k]`` where each scope
  is a module *whose forward ran*, named by its last attribute atom extended over trailing numeric
  atoms. A ``ModuleList`` never runs, so ``model.language_model.layers.0.mlp.up_proj`` is
  ``/model/language_model/layers.0/mlp/up_proj/``, and a ``Sequential`` does, so
  ``model.visual.merger.mlp.0`` is ``/model/visual/merger/mlp/mlp.0/`` (``fallback.exports.node_module``
  reads the module back from a node name).
* The exporter stores equal initializers once and feeds the copies through ``Identity`` nodes;
  ``quantize_static`` leaves a Gemm bias that is not an initializer float, so they are inlined
  (:func:`.onnx_export.inline_constant_identities`).
* Calibration: the activation ranges are ORT's ``MinMaxCalibrater``'s (``create_calibrator``, as
  ``quantize_static`` runs it) over every calibration batch on the one graph, stored as
  ``quantize_static``'s ``calibration_cache_path`` JSON (onnxruntime 1.32).
* ORT's CPU session fuses DequantizeLinear -> MatMul/Gemm -> QuantizeLinear groups into int8
  kernels (QLinearMatMul, QGemm, QLinearConv, MatMulInteger...) where it can; the rest runs as
  DequantizeLinear -> float op -> QuantizeLinear (the float value of the QDQ arithmetic). The
  runtime notes count both, read from the optimized graph the session writes.

Size: a graph whose parameters pass protobuf's 2 GB limit is written with external data (one
``<file>.data`` beside it): the exporter does so on its own above 2 GB, then the export, the
calibrator and ``quantize_static`` (``use_external_data_format``) follow
:func:`.onnx_export.is_large`. At the 3B size (about 3.75 G parameters) the fp32 export is about
15 GB on disk (4 bytes a parameter; more where the exporter folds a transposed copy of a tied
``lm_head`` weight into a new initializer), the QDQ model about a quarter of the quantized weights'
fp32 bytes plus the float ones. Writing holds the float32 torch model (about 15 GB) while the
tracer builds the graph, then ``onnx.load`` / ``quantize_static`` each hold a full copy of the
graph's initializers. The whole 3B was not run here; its widths cut in depth were (docs/deploy.md:
10.4 GiB at 2 of 36 decoder layers, 13.7 GiB at 6), which ``plan.stages.TARGET_FP32_FIT`` follows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_dir
from ..engines import cpu_kind
from ..errors import InputError
from ..fallback.exports import node_module
from ..model.source import load_config
from ..params import TARGET_SCHEMES
from .base import Batch, Inputs, Runtime, Target, dir_bytes
from .causes import Cause
from .onnx_export import OP_TYPES, OPSET, is_large, module_nodes, session, signature
from .onnx_ranges import CACHE_FILE, calibrate
from .onnx_serving import AXES, graph_inputs

log = logging.getLogger(__name__)

EXTRA = "pip install -e '.[ort]'"
SCORED_TYPES = (torch.nn.Linear, torch.nn.Conv3d)  # the ort_qdq scheme's op_types (schemes.ort)
MODEL_FILE = "model.onnx"
EXPORT_FILE = "export.json"
CONFIG_FILE = "config.json"  # the model's config, stored: graph_inputs reads it
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
    bar = 1e-3  # the floor: float summation order (the kernels' cause is measured per run)
    gap = (
        "ORT's fused int8 kernels (QGemm, QLinearMatMul, QLinearConv) accumulate in int32 and requantize "
        "their output, where the prediction rounds a float32 product: an output at a rounding boundary "
        "lands one code apart (4e-5 relative on the small model's logit_se, 5e-7 on the default's KL)"
    )

    def gap_here(self) -> str:
        """ONNX Runtime's MLAS picks its int8 kernels from CPUID (no switch: the AVX2 emulation of
        ``engines.cpu_kind`` does not reach it). Without VNNI they are the saturating ones."""
        if "avx512_vnni" in cpu_kind.cpu_flags():
            return self.gap
        return (
            f"{self.gap}. Not modelled on this CPU, which lacks AVX512-VNNI: ORT's U8S8 kernels form "
            "adjacent u8 x s8 products in a saturating int16 (vpmaddubsw, named in ONNX Runtime's "
            "quantization docs) and the prediction does not (an AVX2-only EPYC reported a KL ratio of "
            "1.75, issue 31); the bar takes it in through the kernels' cause measured on this machine"
        )

    def write(self, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
        if not inputs.calibration:
            raise InputError(f"{inputs.model_dir}: no calibration batches (the cache needs at least one)")
        start = time.perf_counter()
        model = load_fp32(inputs.model_dir)
        kept = kept_modules(model, inputs.quantize, f"{inputs.model_dir}: quantize")
        large = is_large(model)
        config = load_config(inputs.model_dir)  # a snapshot's own for hf_dir: the model dir holds none
        work = inputs.workspace / "ort_write"
        work.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out_dir) as tmp:
            cache = tmp / CACHE_FILE
            fp32, names = calibrate(model, config, inputs.calibration, work, cache, large)
            nodes = quantize_graph(fp32, tmp / MODEL_FILE, inputs.quantize, kept, cache, large)
            shutil.rmtree(work)
            # graph_inputs' glue reads the config: the artifact serves without the model directory
            config.to_json_file(tmp / CONFIG_FILE)
            doc = {
                "inputs": {k: AXES[k] for k in names},
                "outputs": {"logits": AXES["logits"]},
                "traced_on": signature(inputs.calibration[0]),  # the layout the tracer saw
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
        served = _Served(out_dir, export, inputs.workspace)
        return Runtime(
            quantized=self.quantized_in(out_dir),
            forward=served.forward,
            loader=f"onnxruntime {version('onnxruntime')} InferenceSession (CPUExecutionProvider, "
            "ORT_ENABLE_ALL graph optimizations)",
            weights="int8 symmetric per-tensor initializers -> DequantizeLinear (quantize_static QDQ)",
            inputs=f"{served.activation_type} asymmetric per-tensor, static (MinMax ranges of the "
            "calibration split), one QuantizeLinear/DequantizeLinear pair per tensor shared by its readers",
            matmul=f"{MODEL_FILE}: {_describe(served.fused)}",
            notes=served.notes,
            causes=lambda scorer, metric: _kernels_cause(out_dir, export, inputs, served, scorer, metric),
            close=served.close,
        )


def _kernels_cause(
    out_dir: Path, export: dict[str, Any], inputs: Inputs, served: _Served, scorer: Any, metric: str
) -> list[Cause]:
    """ORT's fused int8 kernels as the gap's cause (``quantize.causes``), measured on the machine at
    hand: the same stored file in a session with graph optimizations off runs DequantizeLinear ->
    float op -> QuantizeLinear, the float arithmetic the prediction rounds, so the two sessions
    differ by what the kernels do alone (their int32 requantization; without VNNI, their saturating
    u8 x s8 pairs too)."""
    plain = _Served(out_dir, export, inputs.workspace, optimized=False)
    try:
        value = scorer.against(plain.forward).score(served.forward)[metric]
    finally:
        plain.close()
    how = (
        f"{MODEL_FILE} as served (ORT_ENABLE_ALL, fused int8 kernels) against the same file with graph "
        "optimizations off (DequantizeLinear -> float op -> QuantizeLinear), test split"
    )
    return [Cause("ORT's fused int8 kernels", value, how)]


def _describe(counts: dict[str, int]) -> str:
    kernels = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "dq_float_q") or "no int8 kernel"
    return f"{kernels}; {counts['dq_float_q']} DequantizeLinear -> float MatMul/Gemm/Conv left"


def _read_export(out_dir: Path) -> dict[str, Any]:
    path = out_dir / EXPORT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable ort_qdq export record ({e})") from e
    missing = [k for k in ("inputs", "quantize", "kept", "external_data") if k not in doc]
    if missing:
        raise InputError(f"{path}: missing {missing}")
    return doc


class _Served:
    """The stored ``model.onnx`` in one ORT session, fed per batch by ``graph_inputs`` from the
    stored ``config.json``: what a user runs. ``optimized=False``: graph optimizations off (the
    literal QDQ float graph, for the kernels' cause)."""

    def __init__(self, out_dir: Path, export: dict[str, Any], workspace: Path, optimized: bool = True):
        import onnx

        path, self.names = out_dir / MODEL_FILE, list(export["inputs"])
        self.config = load_config(out_dir)
        self.layouts: set[str] = set()
        self.traced_on = export.get("traced_on")
        if optimized:
            work = workspace / "ort_load"
            work.mkdir(parents=True, exist_ok=True)
            optimized_model = work / "optimized.onnx"
            self.session = session(path, threads=0, optimized_model=optimized_model)
            self.fused = fusion(optimized_model)
            shutil.rmtree(work)
        else:
            self.session = session(path, optimized=False, threads=0)
            self.fused = {"dq_float_q": 0}
        graph = onnx.load(str(path), load_external_data=False).graph
        zps = {i.name: i.data_type for i in graph.initializer}
        types = {
            zps.get(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
        }
        names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
        self.activation_type = "/".join(sorted(names.get(t, str(t)) for t in types))
        self.notes = [
            f"{MODEL_FILE} serves every batch as stored: dynamic axes {sorted(_axes(export))}; the integer "
            "inputs (3-D rope positions, vision positions, window index, cu_seqlens) computed per batch by "
            "op_sensitivity.quantize.onnx_serving.graph_inputs from the stored config.json",
            "input layouts served: none yet",
        ]

    def forward(self, batch: Batch) -> torch.Tensor:
        feeds = graph_inputs(self.config, batch, self.names)
        logits = self.session.run(["logits"], feeds)[0]
        self.layouts.add(signature(batch))
        other = len(self.layouts - {self.traced_on})
        self.notes[1] = f"input layouts served: {len(self.layouts)}, {other} of them not the one traced"
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))

    def close(self) -> None:
        self.session = None


def _axes(export: dict[str, Any]) -> set[str]:
    return {axis for dims in export["inputs"].values() for axis in dims.values()}
