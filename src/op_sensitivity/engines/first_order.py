"""First-order screening: every op's two INC values estimated from a few forward+backward passes.

Why: the exact pass costs about one forward per op, phase and confidence batch (417 ops at 3B: 834
forwards a batch). ``sensitivity.native.screening: first_order`` estimates both phases of every op
from ``first_order_points`` forward+backward passes and ``first_order_probes`` extra backwards per
batch, then :mod:`.screening` measures exactly the ops that decide the ranking and a seeded audit of
the rest. The derivation and what it neglects are in docs/engines.md ("First-order screening").

In short, with ``L(s) = ||f(s) - f(0)||^2`` the pass's value for a state ``s`` (the set of ops in
int8), ``delta_i`` op ``i``'s int8 output minus its float output on the same input, ``g_i`` the
gradient of ``L`` at op ``i``'s output and ``u_i = J_i delta_i`` its effect at the logits:

* fallback (every op int8 but ``i``), expanded at the all-int8 state ``A``:
  ``L(A - i) ~ L(A) - g_i(A) . delta_i + ||u_i||^2``. The last term is the Gauss-Newton second
  order (exact for a network linear in its op outputs); ``||u_i||^2`` is estimated with
  Hutchinson probes ``E_z[(z . u_i)^2]``, ``z ~ N(0, I)`` at the logits, one backward each.
* requant (INC's cumulative curve ``c_k = L(first k ops int8)``): the curve is measured at
  ``first_order_points`` states along it, and between two of them each op's increment is the
  trapezoid ``(g_k(start) + g_k(end)) . delta_k / 2``; the increments of a segment are then fitted
  to its two measured ends, the residual shared in proportion to ``|increment|``. For a network
  linear in its op outputs the trapezoids of a segment sum to its measured rise exactly.

The backward treats each op's quantization as the identity (a straight-through estimator): the
forward value is the int8 output, the Jacobian the float op's. Rounding boundaries, the curvature
of the network and (for a scheme sharing one input quantizer between readers) the sharing are
neglected; the audit measures what that costs on the run itself.

The comparison estimators (``comparisons=True``; :func:`peer_scores`), taken as their tools take
them, at the float model with the task loss (next-token cross entropy on the batch's own tokens):
ModelOpt AutoQuantize's ``sum((g * dY)^2)`` at the unquantized model and AutoRound AutoScheme's
``sum|g_x * (x - Q(x))| + sum|g_W * (W - Q(W))|`` at the all-int8 one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

PROBE_SEED = 20260  # the Hutchinson probes' seed (plus the batch index): the same pass, the same probes


class GradientProbe:
    """Installed as ``FakeQuantModel.probe``: each scored op returns its state's output (int8 or
    float) with the float op's Jacobian, and a hook adds ``g . delta`` of the running backward."""

    def __init__(self, parts: bool = False):
        self.parts = parts
        self.slot: Any = None  # where the running backward's dot products go
        self.dots: dict[Any, dict[str, float]] = {}
        self.squares: dict[Any, dict[str, float]] = {}  # sum((g * delta)^2): ModelOpt's score
        self.part_dots: dict[Any, dict[str, dict[str, float]]] = {}  # AutoRound's weight / input terms

    def run(self, op, x: torch.Tensor, float_fn: Callable, quant_fn: Callable, parts_fn: Callable | None):
        with torch.no_grad():
            x0 = x.detach()
            y_q = quant_fn(x0)
            split = parts_fn(x0) if self.parts and parts_fn is not None else None
        y_f = float_fn(x)
        if not y_f.requires_grad:  # the first op on the path (token ids, pixels): a leaf of its own
            y_f = y_f.detach().requires_grad_()
        delta = (y_q.float() - y_f.detach().float()).detach()
        out = y_q.detach() + (y_f - y_f.detach()) if op.enabled else y_f
        out.register_hook(lambda g, name=op.name: self._tap(name, g, delta, split))
        return out

    def _tap(self, name: str, g: torch.Tensor, delta: torch.Tensor, split: dict | None) -> None:
        g = g.float()
        prod = g * delta
        dots = self.dots.setdefault(self.slot, {})
        dots[name] = dots.get(name, 0.0) + float(prod.sum())
        squares = self.squares.setdefault(self.slot, {})
        squares[name] = squares.get(name, 0.0) + float(prod.pow(2).sum())
        if split is not None:
            terms = self.part_dots.setdefault(self.slot, {}).setdefault(name, {"input": 0.0, "weight": 0.0})
            for k, v in autoround_terms(split, g).items():
                terms[k] += v


def autoround_terms(split: dict[str, Any], g: torch.Tensor) -> dict[str, float]:
    """AutoRound's delta loss of one op call: ``sum|g_qx * (x - Q(x))|`` (per element) and
    ``sum|g_qW * (W - Q(W))|`` (the weight's gradient summed over tokens first), the gradients
    those of the op's output with respect to its quantized input and weight."""
    mod, x, qx = split["module"], split["x"], split["qx"]
    w, qw = split["w"](), split["qw"]()  # made now, dropped after this call
    if isinstance(mod, torch.nn.Embedding):  # weight-only: the rows the ids read
        gw = torch.zeros(w.shape, dtype=torch.float32, device=g.device)
        gw.index_add_(0, x.reshape(-1), g.reshape(-1, w.shape[1]))
        return {"input": 0.0, "weight": float((gw * (w.float() - qw.float())).abs().sum())}
    if isinstance(mod, torch.nn.Linear):
        gx = g @ qw.float()
        gw = g.reshape(-1, g.shape[-1]).T @ qx.float().reshape(-1, qx.shape[-1])
    else:  # Conv3d (the vision patch embedding)
        args = (mod.stride, mod.padding, mod.dilation, mod.groups)
        gx = torch.nn.grad.conv3d_input(qx.shape, qw.float(), g, *args)
        gw = torch.nn.grad.conv3d_weight(qx.float(), qw.shape, g, *args)
    return {
        "input": float((gx * (x.float() - qx.float())).abs().sum()),
        "weight": float((gw * (w.float() - qw.float())).abs().sum()),
    }


@dataclass
class Estimate:
    """One confidence batch's estimate, in the pass's scored order."""

    fallback: list[float]  # L(all int8 but op i)
    requant: list[float]  # the cumulative curve c_k
    points: list[int]  # the curve positions measured (k: the first k scored ops int8)
    curve: list[float]  # c at those positions (the probe forwards' values)
    residual: list[float]  # per segment: measured rise minus the trapezoids' sum (before the fit)
    second_order: list[float]  # ||u_i||^2 per op (Hutchinson)
    first_order: list[float]  # g_i(A) . delta_i per op
    forwards: int = 0
    backwards: int = 0
    seconds: float = 0.0
    peers: dict[str, list[float]] = field(default_factory=dict)  # comparison estimators


def curve_points(n_ops: int, points: int) -> list[int]:
    """The cumulative curve's measured positions: ``points`` of them, evenly along the scored order,
    the last being all int8 (the fallback phase's expansion point)."""
    count = min(points, n_ops)
    return sorted({max(1, round(m * n_ops / count)) for m in range(1, count + 1)})


@contextlib.contextmanager
def probing(fq, parts: bool = False) -> Iterator[GradientProbe]:
    """The sweep's forwards: gradients on, every op tapped, no parameter accumulating a gradient."""
    probe = GradientProbe(parts)
    params = [p for p in fq.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    fq.probe = probe
    try:
        with torch.enable_grad():
            yield probe
    finally:
        fq.probe = None
        for p in params:
            p.requires_grad_(True)


def _set_prefix(fq, scored: list[str], k: int) -> None:
    """The cumulative curve's state ``k``: the first ``k`` scored ops int8, the rest float."""
    for i, name in enumerate(scored):
        fq.set(name, i < k)


def estimate_batch(
    fq,
    forward: Callable[[], torch.Tensor],
    ref: torch.Tensor,
    scored: list[str],
    points: int,
    probes: int,
    seed: int,
) -> Estimate:
    """Both phases of every scored op on one batch (the derivation: the module docstring).

    ``forward()`` runs the model and returns the last op's output (the logits), ``ref`` the float32
    reference; ``fq`` is calibrated on the batch. Leaves every op int8.
    """
    start = time.perf_counter()
    n = len(scored)
    at = curve_points(n, points)
    curve, forwards, backwards = [], 0, 0
    with probing(fq) as probe:
        for m, k in enumerate(at):
            _set_prefix(fq, scored, k)
            out = forward()
            loss = (out - ref).pow(2).sum()
            curve.append(float(loss.detach()))
            forwards += 1
            last = k == n
            probe.slot = ("point", m)
            loss.backward(retain_graph=last and probes > 0)
            backwards += 1
            if last:
                gen = torch.Generator(device=out.device).manual_seed(PROBE_SEED + seed)
                for r in range(probes):
                    probe.slot = ("probe", r)
                    z = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
                    (out * z).sum().backward(retain_graph=r < probes - 1)
                    backwards += 1
            del out, loss
    dots = probe.dots
    at_all = dots.get(("point", len(at) - 1), {})
    first = [at_all.get(name, 0.0) for name in scored]
    second = [
        sum(dots.get(("probe", r), {}).get(name, 0.0) ** 2 for r in range(probes)) / probes if probes else 0.0
        for name in scored
    ]
    total = curve[-1]
    fallback = [max(total - f + s, 0.0) for f, s in zip(first, second, strict=True)]
    requant, residual = _curve(scored, at, curve, dots)
    return Estimate(
        fallback,
        requant,
        at,
        curve,
        residual,
        second,
        first,
        forwards,
        backwards,
        time.perf_counter() - start,
    )


def _curve(
    scored: list[str], at: list[int], curve: list[float], dots: dict
) -> tuple[list[float], list[float]]:
    """The cumulative curve at every op: trapezoid increments between measured points, fitted to them."""
    values: list[float] = []
    residual: list[float] = []
    lo, c_lo = 0, 0.0
    for m, (hi, c_hi) in enumerate(zip(at, curve, strict=True)):
        start = dots.get(("point", m - 1), {}) if m > 0 else {}  # the float state's gradient is zero
        end = dots.get(("point", m), {})
        names = scored[lo:hi]
        inc = [(start.get(o, 0.0) + end.get(o, 0.0)) / 2 for o in names]
        rest = (c_hi - c_lo) - sum(inc)
        residual.append(rest)
        weight = [abs(v) for v in inc]
        total = sum(weight)
        share = [w / total for w in weight] if total > 0 else [1 / len(inc)] * len(inc)
        c = c_lo
        for v, s in zip(inc, share, strict=True):
            c += v + rest * s
            values.append(c)
        values[-1] = c_hi  # the measured point itself (the sum above may miss it by rounding)
        lo, c_lo = hi, c_hi
    return values, residual


def task_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Next-token cross entropy on the batch's own tokens (the peers' loss, with labels = inputs)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    target = ids[:, 1:].clone()
    if mask is not None:
        target[mask[:, 1:] == 0] = -100
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
    )


def peer_scores(
    fq, forward: Callable[[], torch.Tensor], batch: dict, scored: list[str]
) -> dict[str, list[float]]:
    """ModelOpt's and AutoRound's gradient scores of every op on one batch, each as its tool takes it
    (read from ModelOpt's ``algorithms.py`` and AutoRound's ``auto_scheme/delta_loss.py``), with the
    task loss (next-token cross entropy, labels = the batch's tokens); higher = more sensitive.

    * ModelOpt AutoQuantize: ``sum((g * dY)^2)`` at the unquantized model (``dY``: the op's int8
      output minus its float output on the same input), one forward + backward.
    * AutoRound AutoScheme: :func:`autoround_terms` in the all-quantized model, one forward +
      backward; None for an op computed by another scheme's quantizers.
    """
    out = {}
    for name, state in (("modelopt", False), ("autoround", True)):
        fq.set_all(state)
        with probing(fq, parts=state) as probe:
            probe.slot = name
            task_loss(forward(), batch).backward()
        if state:
            parts = probe.part_dots.get(name, {})
            out[name] = [parts[o]["input"] + parts[o]["weight"] if o in parts else None for o in scored]
        else:
            squares = probe.squares.get(name, {})
            out[name] = [squares.get(o, 0.0) for o in scored]
    return out
