"""Activation ranges for ``quantize_static``: ORT's ``MinMaxCalibrater`` over every calibration
batch, one fp32 export per batch layout, merged by node and role so that any layout's export is
quantized from the same ranges (:mod:`.onnx_runtime` says why the tensor names move)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from .base import Batch
from .onnx_export import FP32_FILE, OP_TYPES, export_onnx, feed, feeds_reader, module_nodes, signature

CACHE_FILE = "calibration_ranges.json"
ROLES_FILE = "ranges_by_node.json"  # the same ranges by node and role, for another layout's export


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
