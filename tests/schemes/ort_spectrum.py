"""Reference per-op sensitivities measured with ONNX Runtime's own static quantizer.

``ort_spectrum`` exports the whole fp32 Qwen2.5-VL (vision tower included, fixed shapes: one batch)
with the TorchScript exporter, quantizes it with ``onnxruntime.quantization.quantize_static`` (QDQ,
every other argument left at ORT's defaults: int8 asymmetric per-tensor activations from MinMax
calibration, int8 symmetric per-tensor weights) restricted to the scored modules' nodes, runs the
quantized and the float graph with ORT (CPUExecutionProvider) on the same inputs, and scores
``sum((out_q - out_fp32) ** 2)`` in float64 at ``measured_at``'s output.

What the export and ORT do (onnxruntime 1.32, torch 2.13):

* Export: ``torch.onnx.export(..., dynamo=False)``. The default (dynamo) exporter needs the
  ``onnxscript`` package. Tracing freezes the data-dependent vision code (``image_grid_thw``'s
  ``.tolist()``, the window indices) into constants, so ``image_grid_thw`` is no graph input: the
  graph holds for this batch's shapes and grid only.
The export helpers are the library's (``op_sensitivity.quantize.onnx_runtime``, which the
``ort_qdq`` deployment target uses); this module holds the spectrum trials only.

* Node names: the TorchScript exporter names a node ``/<scope>/.../<OpType>[_k]`` where each scope
  is a module *whose forward ran*, named by its last attribute atom extended over trailing numeric
  atoms (``torch.onnx`` ``_unqualified_variable_name``). A ``ModuleList`` never runs, so
  ``model.language_model.layers.0.mlp.up_proj`` is ``/model/language_model/layers.0/mlp/up_proj/``
  (not ``.../layers/0/...``), and a ``Sequential`` does, so ``model.visual.merger.mlp.0`` is
  ``/model/visual/merger/mlp/mlp.0/``. :func:`node_prefix` rebuilds that from the modules seen running.
* The exporter stores equal initializers once and feeds the copies through ``Identity`` nodes (the
  tiny model's all-zero biases); ORT would leave such a Gemm bias float, so they are inlined back
  into initializers (:func:`inline_constant_identities`).
* A Linear with bias whose input is 2-D (the vision tower) is one ``Gemm``; ORT quantizes its bias to
  int32 (scale = input scale x weight scale) and puts the output Q/DQ after the bias. A 3-D input
  (the text side) gives ``MatMul`` + ``Add``: the output Q/DQ sits on the MatMul's output, *before*
  the float bias ``Add``.
* Q/DQ placement: one pair on each quantized node's activation input and one on its output, a
  weight is stored int8 with a DequantizeLinear. A tensor gets one pair however many nodes read it,
  and every reader is rewired to the DequantizeLinear's output (``replace_input_of_all_nodes``):
  float readers too. So a node kept float whose input is shared with a quantized one
  (``gate_proj`` / ``up_proj``, ``q``/``k``/``v_proj``) still reads the fake-quantized activation;
  only its weight and output stay float. ``extra_options={"DedicatedQDQPair": True}`` gives each
  quantized reader its own pair, but only where two or more quantized nodes read the tensor: with
  ``q_proj``, ``v_proj`` quantized, a float ``k_proj`` reads the float tensor; with ``up_proj`` the
  only quantized reader, a float ``gate_proj`` still reads the fake-quantized one. The output pair
  of one quantized node is the input pair of the next where a tensor joins two of them directly.
* ``quant_pre_process`` (not run here) keeps node names as prefixes but fuses the text side's
  ``MatMul`` + bias ``Add`` into a ``Gemm`` named ``<MatMul name>/MatMulAddFusion``, which moves the
  bias into the int32-quantized Gemm and the output Q/DQ after it.
* The default session fuses Q/DQ groups into int8 kernels where it can (on the small model's
  all-int8 graph: 1 QLinearConv, 5 QGemm, 3 QLinearMatMul; the rest stays DQ -> float op -> Q);
  ``optimized=False`` runs the literal QuantizeLinear/DequantizeLinear float graph. On the small
  model the values differ by 3e-6 relative at most.
* ``quantize_static``'s ``calibration_cache_path`` (onnxruntime 1.32) is used to calibrate once:
  the calibrator records every MatMul/Gemm/Conv input and output whatever ``nodes_to_quantize``
  says, so one cache serves every trial.
* ``nodes_to_quantize=[]`` means "every node" to ORT, so an empty quantized set is not quantized at
  all: its value is 0.0.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantFormat, quantize_static

from op_sensitivity.quantize.onnx_export import FP32_FILE, OP_TYPES, export_onnx, feeds_reader, session
from op_sensitivity.quantize.onnx_ranges import CACHE_FILE

Spectrum = dict  # {"fallback": {module_name: float}, "requant": {module_name: float}, "all_int8": float}

log = logging.getLogger(__name__)


def _unqualified(path: str) -> str:
    """torch.onnx's scope atom: the last non-numeric atom of a module path and what follows it."""
    atoms = path.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return path


def called_modules(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> set[str]:
    """Names of the modules whose forward runs on ``batch`` (the scopes the tracer records)."""
    seen: set[str] = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=name: seen.add(n))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def node_prefix(module: str, called: set[str]) -> str:
    """The node-name prefix the TorchScript exporter gives ``module``'s nodes."""
    atoms = module.split(".")
    scopes = [".".join(atoms[: i + 1]) for i in range(len(atoms))]
    return "/" + "/".join(_unqualified(s) for s in scopes if s in called) + "/"


def scored_nodes(graph: onnx.GraphProto, prefixes: dict[str, str]) -> dict[str, list[str]]:
    """Each module's MatMul / Gemm / Conv node names; every module must have at least one."""
    out: dict[str, list[str]] = {}
    for module, prefix in prefixes.items():
        legacy = "/" + module.replace(".", "/") + "/"  # the dotted rule, for exporters that use it
        hits = [
            n.name
            for n in graph.node
            if n.op_type in OP_TYPES and (n.name.startswith(prefix) or n.name.startswith(legacy))
        ]
        if not hits:
            raise ValueError(f"{module}: no {'/'.join(OP_TYPES)} node named {prefix}* in the export")
        out[module] = hits
    return out


def _expose(model: onnx.ModelProto, tensor: str) -> None:
    if tensor not in {o.name for o in model.graph.output}:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))


def measured_output(graph: onnx.GraphProto, prefix: str) -> str:
    """The output of the last node under ``prefix`` (graph order is topological)."""
    nodes = [n for n in graph.node if n.name.startswith(prefix)]
    if not nodes:
        raise ValueError(f"no node named {prefix}* in the export")
    return nodes[-1].output[0]


class OrtTrials:
    """An exported float graph, its scored modules' nodes, and ``quantize_static`` trials on it."""

    def __init__(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        scored: list[str],
        measured_at: str,
        workdir: Path,
        optimized: bool = True,
        extra_options: dict | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fp32 = self.workdir / FP32_FILE
        self.cache = self.workdir / CACHE_FILE
        self.cache.unlink(missing_ok=True)  # ranges of another model or batch must not leak in
        self.optimized = optimized
        self.extra_options = extra_options
        self.scored = list(scored)

        inputs = export_onnx(model, batch, self.fp32)
        self.feed = {k: batch[k].detach().cpu().numpy() for k in inputs}
        called = called_modules(model, batch)
        proto = onnx.load(str(self.fp32))
        self.nodes = scored_nodes(proto.graph, {m: node_prefix(m, called) for m in self.scored})
        self.output = measured_output(proto.graph, node_prefix(measured_at, called))
        if self.output not in {o.name for o in proto.graph.output}:
            _expose(proto, self.output)
            onnx.save(proto, str(self.fp32))
        self.reference = self.run(self.fp32)
        self.seconds: list[float] = []

    def run(self, path: Path) -> np.ndarray:
        return session(path, self.optimized).run([self.output], self.feed)[0]

    def quantize(self, quantized: list[str], out: Path) -> Path:
        """``quantize_static``: the nodes of ``quantized`` quantized, the other scored ones excluded."""
        chosen = set(quantized)
        to_quantize = [n for m in self.scored if m in chosen for n in self.nodes[m]]
        to_exclude = [n for m in self.scored if m not in chosen for n in self.nodes[m]]
        quantize_static(
            str(self.fp32),
            str(out),
            feeds_reader([self.feed]),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=OP_TYPES,
            nodes_to_quantize=to_quantize,
            nodes_to_exclude=to_exclude,
            extra_options=self.extra_options,
            calibration_cache_path=str(self.cache),
        )
        return out

    def value(self, quantized: list[str], keep: str | None = None) -> float:
        """``sum((out_q - out_fp32)^2)`` (float64) with ``quantized`` int8; 0.0 when none is."""
        if not quantized:
            return 0.0
        start = time.perf_counter()
        out = self.workdir / (keep or "trial.onnx")
        got = self.run(self.quantize(quantized, out))
        diff = got.astype(np.float64) - self.reference.astype(np.float64)
        self.seconds.append(time.perf_counter() - start)
        return float((diff**2).sum())


def ort_spectrum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    scored: list[str],
    measured_at: str,
    workdir: Path,
    **options,
) -> Spectrum:
    """ORT's all-int8, fallback (all scored but one) and cumulative requant values.

    ``options`` go to :class:`OrtTrials`. ``optimized=False`` runs the Q/DQ graphs with graph
    optimizations off (the literal QuantizeLinear/DequantizeLinear float arithmetic) instead of
    ORT's default session, which fuses Q/DQ around MatMul/Gemm into int8 kernels.
    ``extra_options`` goes to ``quantize_static`` as is (None: ORT's defaults). Leaves
    ``model_fp32.onnx``, ``all_int8.onnx`` and the calibration cache in ``workdir``.
    """
    trials = OrtTrials(model, batch, scored, measured_at, workdir, **options)
    spectrum: Spectrum = {
        "all_int8": trials.value(scored, keep="all_int8.onnx"),
        "fallback": {},
        "requant": {},
    }
    for name in scored:
        spectrum["fallback"][name] = trials.value([m for m in scored if m != name])
    for i, name in enumerate(scored):
        spectrum["requant"][name] = trials.value(scored[: i + 1])
    if trials.seconds:
        log.info("ort_spectrum: %d trials, %.3f s each (mean)", len(trials.seconds), np.mean(trials.seconds))
    return spectrum
