"""Quantization schemes as data: what a deployment tool quantizes and with which numerics.

An op's sensitivity depends on the scheme it is measured under, and the keep-lists go to tools
that do not use INC's. Each scheme is a :class:`~.spec.Scheme` (weights, input activations,
output activations, each a :class:`~.spec.QuantSpec`; the module-name globs the tool leaves in
high precision by default), read from the tool's own defaults where the tool is installed
(one module per tool), and one generic quantize-dequantize (:mod:`.qdq`) computes every scheme.
The tests hold each scheme's QDQ of a known tensor to the tool's own quantizer, to the bit.

Schemes (``describe(name)``):

* ``inc_cpu``: INC's default CPU scheme, what the native engine computes today.
* ``modelopt_int8`` / ``modelopt_fp8``: NVIDIA ModelOpt ``INT8_DEFAULT_CFG`` / ``FP8_DEFAULT_CFG``.
* ``llmcompressor_w8a8``: compressed-tensors' ``W8A8`` preset (what vLLM serves).
* ``ort_qdq``: ONNX Runtime ``quantize_static`` defaults (QDQ format).

``describe`` reads a tool live; ``load`` reads the versioned catalog the pipeline runs from.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import InputError
from ..params import SCHEMES
from . import catalog, compressed_tensors, inc_cpu, modelopt, ort
from .qdq import fake_quant, observe
from .spec import QuantSpec, Scheme

DESCRIBE: dict[str, Callable[[], Scheme]] = {
    "inc_cpu": inc_cpu.describe,
    "modelopt_int8": lambda: modelopt.describe("INT8_DEFAULT_CFG", "modelopt_int8"),
    "modelopt_fp8": lambda: modelopt.describe("FP8_DEFAULT_CFG", "modelopt_fp8"),
    "llmcompressor_w8a8": compressed_tensors.describe,
    "ort_qdq": ort.describe,
}


assert tuple(DESCRIBE) == SCHEMES, "params.SCHEMES names the schemes sensitivity.native.scheme accepts"


def describe(name: str, where: str = "scheme") -> Scheme:
    """The named scheme, read from its tool; a clear error for an unknown name or a missing tool."""
    if name not in DESCRIBE:
        raise InputError(f"{where}: unknown scheme {name!r}; expected one of {sorted(DESCRIBE)}")
    return DESCRIBE[name]()


def load(name: str, where: str = "scheme") -> Scheme:
    """The named scheme as the pipeline runs it: from the versioned catalog (:mod:`.catalog`)."""
    if name not in DESCRIBE:
        raise InputError(f"{where}: unknown scheme {name!r}; expected one of {sorted(DESCRIBE)}")
    return catalog.read(name)


__all__ = ["DESCRIBE", "QuantSpec", "Scheme", "describe", "fake_quant", "load", "observe"]
