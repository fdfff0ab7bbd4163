"""Activation ranges for ``quantize_static``: ORT's ``MinMaxCalibrater`` over every calibration
batch, run on the serving graph (:mod:`.onnx_serving`), which takes every batch as it is: one
export, one calibrator run, the batches merged as the calibrator merges them (min of minima, max
of maxima)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig

from ..errors import InputError
from .base import Batch
from .onnx_export import FP32_FILE, OP_TYPES, feeds_reader
from .onnx_serving import export_serving, graph_inputs, input_names

CACHE_FILE = "calibration_ranges.json"


def _calibrate(fp32: Path, feeds: list[dict[str, np.ndarray]], workdir: Path, large: bool) -> Any:
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


def calibrate(
    model: torch.nn.Module,
    config: Qwen2_5_VLConfig,
    batches: list[Batch],
    workdir: Path,
    cache: Path,
    large: bool,
) -> tuple[Path, list[str]]:
    """Export the serving graph to ``workdir`` (traced on the first batch), write ``cache``
    (``quantize_static``'s calibration cache) from every batch; the fp32 graph and its input names."""
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    kinds = {tuple(input_names(b)) for b in batches}
    if len(kinds) != 1:
        raise InputError(
            f"the calibration split mixes batches with and without images ({sorted(kinds)}): "
            "one serving graph takes one kind"
        )
    fp32 = workdir / FP32_FILE
    names = export_serving(model, config, batches[0], fp32, large)
    data = _calibrate(fp32, [graph_inputs(config, b, names) for b in batches], workdir, large)
    for f in workdir.glob("augmented_model.onnx*"):
        f.unlink()
    # the calibrator's tensor order varies from run to run: sorted, the cache is a function of its inputs
    save_tensors_data(TensorsData(data.calibration_method, dict(sorted(data.data.items()))), cache)
    return fp32, names
