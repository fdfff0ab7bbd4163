"""A target's agreement bar, derived on each run from the causes of its gap measured on that run.

Why: a fixed bar (a small multiple of the first value observed) says nothing on another model,
size or machine: the full-size 3B's ModelOpt INT8 checkpoint, run as stored in bf16, measured a
KL 1.11 times the float32 prediction against a fixed bar of 0.001, and nothing said whether that
was the stored dtype or a broken export. A cause the prediction does not model is measured alone
on the same split, and the bar follows from it.

The bound (second order). Write a runtime's logits on one token as ``r + a + b``: ``r`` the float32
reference, ``a`` the quantization the prediction models, ``b`` what the runtime adds (a cause).
KL to the reference is ``1/2 (a + b)^T F (a + b)`` to second order (``F`` the softmax's Fisher
matrix at ``r``), so measured - predicted is ``a^T F b + 1/2 b^T F b`` and, by Cauchy-Schwarz in
``F`` (summed over tokens as well),

    |measured - predicted| <= K + 2 sqrt(predicted K),   K = 1/2 b^T F b,

where ``K`` is the cause's own KL, measured alone on the same split: for the stored dtype, the
float model as stored against the float32 reference; for a cause inside a runtime, the runtime as
served against itself with that cause removed (its own switch: ORT's graph optimizations off,
compressed-tensors' 2-D inputs fed per row). Several causes: ``sqrt K <= sum sqrt K_c``. For
``logit_se`` (squared logit error, ``F = I``) the same inequality holds exactly, with ``K`` the
cause's own squared error. ``top1`` and ``nll`` have no such bound: their bar stays the target's
floor and the document says so.

The bound assumes the cause's ``b`` on the quantized model is its ``b`` on the float one (first
order in the cause); a cause that interacts with the quantization (a rounding boundary crossed
because the input moved) is what the target's floor stands for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

BOUNDED = ("kl", "logit_se")  # the metrics whose gap the bound covers (module doc)


@dataclass(frozen=True)
class Cause:
    """One cause of a target's gap, measured alone on the test split (``value``: the headline
    metric between a model with the cause and the same without it; ``how`` says which two)."""

    name: str
    value: float
    how: str  # what was run to measure it


def gap_bound(predicted: float, causes: list[Cause]) -> float:
    """The most the causes can move the measured metric away from ``predicted`` (module doc)."""
    root = sum(math.sqrt(max(c.value, 0.0)) for c in causes)
    return root * root + 2.0 * math.sqrt(max(predicted, 0.0)) * root


def derived_bar(metric: str, floor: float, predicted: float, causes: list[Cause]) -> dict[str, Any]:
    """The relative bar on ``measured / predicted - 1``: the target's floor plus the causes'
    bound over the prediction; with the causes and how the bar was reached."""
    doc: dict[str, Any] = {"floor": floor, "causes": [asdict(c) for c in causes]}
    if not causes:
        return {"bar": floor, **doc, "derivation": "floor only: no cause of this run needs a term"}
    if metric not in BOUNDED:
        return {
            "bar": floor,
            **doc,
            "derivation": f"floor only: no bound for {metric} (the bound covers {' and '.join(BOUNDED)})",
        }
    bound = gap_bound(predicted, causes)
    if predicted <= 0:
        return {"bar": floor, **doc, "bound": bound, "derivation": "prediction 0: within means equal"}
    return {
        "bar": floor + bound / predicted,
        **doc,
        "bound": bound,
        "derivation": f"floor + (K + 2 sqrt(predicted K)) / predicted; sqrt K: causes' sqrt {metric} summed",
    }
