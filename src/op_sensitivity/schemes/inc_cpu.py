"""``inc_cpu``: the scheme INC's FX path applies by default on CPU, as the native engine computes it
(``engines.fakequant``; its values equal INC's, see docs/engines.md). Activations: uint8 asymmetric
per tensor from a histogram (KL) observer at each op's input and output; weights int8 symmetric
per output channel; Embedding weight-only (float qparams per row)."""

from __future__ import annotations

from typing import Any

from .spec import QuantSpec, Scheme

ACTIVATIONS = QuantSpec("uint8", "tensor", symmetric=False, observer="histogram")


def describe() -> Scheme:
    return Scheme(
        name="inc_cpu",
        library="neural-compressor",
        weights=QuantSpec("int8", "channel", symmetric=True),
        inputs=ACTIVATIONS,
        outputs=ACTIVATIONS,
        op_types=("Linear", "Conv3d", "Embedding"),
        source="INC 2.x FX capability (PostTrainingQuantConfig defaults, CPU)",
        notes=("reduce_range (7-bit activations) on CPUs without AVX512-VNNI",),
    )


def by_op_type(op_type: str) -> dict[str, Any]:
    """The scheme of one op type as the sensitivity report records it (INC's vocabulary)."""
    if op_type == "Embedding":
        return {
            "weight": {
                "dtype": "uint8",
                "scheme": "asym_float",
                "granularity": "per_channel",
                "algorithm": "minmax",
            },
            "activation": {"dtype": "fp32"},
        }
    s = describe()
    return {
        "weight": {
            "dtype": s.weights.dtype,
            "scheme": "sym",
            "granularity": "per_channel",
            "algorithm": s.weights.observer,
        },
        "activation": {
            "dtype": s.inputs.dtype,
            "scheme": "asym",
            "granularity": "per_tensor",
            "algorithm": "kl",
        },
    }
