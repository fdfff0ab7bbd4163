"""Several native trials in one forward: the trial index as a batch dimension.

Why: with suffix reuse a trial of an op in the last decoder layers (or of ``lm_head``) recomputes
only a short suffix of the model, so on a GPU each such forward is a handful of small, launch-bound
kernels. :func:`run_trials` runs T such trials as one forward whose suffix carries T copies of the
batch, trial-major along dim 0 (row ``t*B + j`` is sample ``j`` of trial ``t``):

* the first block any trial changes (its decoder layer, or the head when every trial toggles the
  head only) gets its inputs repeated T times along dim 0 by a forward pre-hook: the hidden state
  always, and with B > 1 every other tensor argument whose dim 0 is the batch (the attention mask,
  the rotary cos/sin, text position ids); with B == 1 those broadcast as they are;
* every toggled op computes per trial (:meth:`FakeQuantModel.trials`): the path most trials take
  (int8 in the fallback phase) on all rows, each other path on its trials' rows, written over
  them (:func:`.fakequant.by_trial`);
* everything else in the suffix is row-wise (norms, MLP, attention per sample), so the captured
  logits are (T*B, S, V) and trial t's error is the sum over its B rows.

Values equal those of one trial per forward, to the bit on CPU (float32 with ``fake_quant`` and
``int8_kernels``, B = 1 and 2, 1 and 2 threads, generic schemes too: ``tests/engines/test_trial_batch``;
bf16 autocast matched too), wherever every kernel in the suffix gives a row the same bits whatever
rows lie beside it. What was found not to, on this CPU (MKL 2024.2, AVX-512):

* torch's elementwise loops: SiLU's vector and scalar code differ in the last bit on ~4 % of
  inputs, and which elements take the scalar remainder depends on the tensor's size and thread
  chunks. Handled: the batched blocks' parameter-free leaves (the activation) run per trial
  (:func:`_leaves_per_trial`);
* MKL sgemm, multi-threaded, on fewer than 12 rows (except 4 and 8) takes another kernel than on
  more rows (a trial of B x S < 12 tokens would differ; real batches have far more);
* MKL sgemm where the inner dimension K is not a multiple of 4: a row's result depends on its
  address modulo 16 bytes, and trial t's rows start t x B x S x K floats later (model widths are
  multiples of 64).

On a GPU, cuBLAS picks its kernel (tiles, split-K) from the row count, so values may differ in the
last bits there (not measured here).

Memory: the suffix's activations and the logits T times over (the logits dominate at a real
vocabulary: 4 x B x S x V bytes per trial in float32, e.g. about 0.2 GB per trial for the 3B's
152k vocabulary and 300 tokens), plus one trial's error temporary. Pick T to fit.

Vision blocks are not batched (their hidden states have no batch dimension); nor are ops before
the decoder layers (the embedding). :func:`trial_start` says which ops can be.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .fakequant import FakeQuantModel
from .reuse import block_stacks, vision_tower


def decoder_layers(model: nn.Module) -> list[str]:
    """The names of the decoder layers (``*.layers`` blocks outside the vision tower), in order."""
    visual = vision_tower(model)
    inside = set() if visual is None else {id(m) for m in visual.modules()}
    return [
        name
        for name, block in block_stacks(model)
        if name.rpartition(".")[0].rpartition(".")[2] == "layers" and id(block) not in inside
    ]


def trial_start(layers: list[str], op: str, head: str) -> int | None:
    """Where a trial toggling ``op`` starts to differ from the base: its decoder layer's index in
    ``layers``, ``len(layers)`` for the head (the last op, after every layer); None where it cannot
    be batched (a vision op, the embedding, anything outside the decoder layers)."""
    if op == head:
        return len(layers)
    return next((i for i, layer in enumerate(layers) if op.startswith(f"{layer}.")), None)


def fallback_states(names: Sequence[str]) -> list[dict[str, bool]]:
    """The fallback phase's trials: op ``names[t]`` float (off) in trial t, every other op as set."""
    return [{name: False} for name in names]


def plan(
    layers: list[str], names: Sequence[str], head: str, *, last_layers: int, max_trials: int
) -> tuple[list[list[str]], list[str]]:
    """Which trials to batch: ``names`` whose trial starts in the last ``last_layers`` decoder layers
    or at the head, in runs of at most ``max_trials`` (their order kept, so a run mostly shares its
    first layer); the others, to measure one forward each."""
    cut = len(layers) - last_layers
    near, far = [], []
    for name in names:
        start = trial_start(layers, name, head)
        (near if start is not None and start >= cut else far).append(name)
    return [near[i : i + max_trials] for i in range(0, len(near), max_trials)], far


def batchable(fq: FakeQuantModel) -> bool:
    """False where one forward cannot hold several trials: a scheme with a dynamic per-tensor
    activation scale takes it over the whole tensor, so each trial's scale would see the others."""
    specs = (fq.scheme.inputs, fq.scheme.outputs)
    return fq.scheme.name == "inc_cpu" or not any(
        s is not None and s.dynamic and s.granularity == "tensor" for s in specs
    )


def run_trials(
    model: nn.Module,
    fq: FakeQuantModel,
    forward: Callable[[], torch.Tensor],
    ref: torch.Tensor,
    states: Sequence[Mapping[str, bool]],
    head: str,
) -> list[float]:
    """Each trial's error ``sum((logits - ref)^2)`` from one forward, as one forward per trial gives.

    ``states[t]``: the ops trial t sets (name -> quantized); every other op keeps ``enabled``.
    ``forward()`` runs the model on the batch and returns the logits captured at ``head``
    (float), T*B rows here; ``ref`` is the batch's float32 reference (B rows). Before the call,
    ``fq`` holds the base state the trials depart from (all int8 for fallback) and, with suffix
    reuse, the cache holds that state's block outputs (``record`` either way: nothing of these
    forwards is stored). After it, ``fq``'s flags are as before and the model and the caches are
    as they were. Raises ValueError if an op cannot be batched (:func:`trial_start`).
    """
    if not states:
        return []
    if not batchable(fq):
        raise ValueError(f"run_trials: scheme {fq.scheme.name} has dynamic per-tensor activation scales")
    per_trial = {
        name: tuple(state.get(name, fq.ops[name].enabled) for state in states)
        for name in dict.fromkeys(n for state in states for n in state)
    }
    if not per_trial:  # no trial sets anything: each is the current state
        return [float((forward() - ref).pow(2).sum())] * len(states)
    layers = decoder_layers(model)
    starts = {name: trial_start(layers, name, head) for name in per_trial}
    if None in starts.values():
        bad = sorted(name for name, s in starts.items() if s is None)
        raise ValueError(f"run_trials: {bad} run outside the decoder layers and the head; not batchable")
    first = min(starts.values())
    modules = dict(model.named_modules())
    trials, rows = len(states), ref.shape[0]
    # the first changed block gets its hidden state repeated; each later layer its own side
    # inputs (mask, cos/sin), which the model hands every layer afresh
    entries = [modules[name] for name in layers[first:]] or [modules[head]]
    hooks = [
        block.register_forward_pre_hook(_expander(trials, rows, hidden=i == 0), with_kwargs=True)
        for i, block in enumerate(entries)
    ]
    try:
        with torch.no_grad(), fq.trials(per_trial), _leaves_per_trial(entries, trials, rows):
            out = forward()
    finally:
        for hook in hooks:
            hook.remove()
    if out.shape[0] != trials * rows:
        raise RuntimeError(f"run_trials: logits have {out.shape[0]} rows, expected {trials} x {rows}")
    # one trial's rows as a fresh tensor of the single forward's shape: its sum reduces in the same order
    return [float((out[t * rows : (t + 1) * rows] - ref).pow(2).sum()) for t in range(trials)]


@contextlib.contextmanager
def _leaves_per_trial(blocks: list[nn.Module], trials: int, rows: int) -> Iterator[None]:
    """On CPU, each parameter-free leaf module of the batched blocks (the MLP's activation) runs
    once per trial, on that trial's rows.

    Why: torch's CPU elementwise loops compute groups of 2 x the vector width (32 floats with
    AVX-512) with the vector code and each chunk's remainder with the scalar code, and SiLU's two
    differ in the last bit on about 4 % of inputs. Which elements fall in a remainder depends on
    the tensor's size (and, multi-threaded, on the chunk each thread gets), so one trial's rows
    inside a T-times larger tensor can take the other path. A trial's own rows are a tensor of the
    single forward's size: the same split, the same bits. T small calls per layer cost little on
    CPU; on a GPU (no such split, and not bit-identical anyway) the leaves run batched.
    """
    leaves = [
        m
        for block in blocks
        for m in block.modules()
        if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is None
    ]
    saved = [vars(m).get("forward") for m in leaves]
    for m in leaves:
        m.forward = _per_trial(m.forward, trials, rows)
    try:
        yield
    finally:
        for m, before in zip(leaves, saved, strict=True):
            if before is None:
                del m.forward
            else:
                m.forward = before


def _per_trial(original: Callable, trials: int, rows: int) -> Callable:
    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            not isinstance(x, torch.Tensor)
            or x.device.type != "cpu"
            or trials == 1
            or x.dim() == 0
            or x.shape[0] != trials * rows
        ):
            return original(x, *args, **kwargs)
        return torch.cat([original(part, *args, **kwargs) for part in x.split(rows)])

    return forward


def _expander(trials: int, rows: int, hidden: bool) -> Callable:
    """A forward pre-hook repeating a block's batch ``trials`` times along dim 0 (trial-major):
    with ``hidden`` its hidden state (the first block), else only its side inputs (a later layer,
    whose hidden state arrives repeated)."""
    width = trials * rows

    def repeat(x: Any, always: bool) -> Any:
        if isinstance(x, (tuple, list)):
            return type(x)(repeat(v, always) for v in x)
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != rows:
            return x
        if not always and rows == 1:  # a batch of one broadcasts over the trials as it is
            return x
        return x.repeat(trials, *([1] * (x.dim() - 1)))

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        state = args[0] if args else kwargs.get("hidden_states")
        if (
            not isinstance(state, torch.Tensor)
            or state.dim() < 2
            or state.shape[0] != (rows if hidden else width)
        ):
            raise ValueError(f"run_trials: a batched block's input is not {trials} trial(s) of {rows}")
        if hidden:
            state = repeat(state, True)
        if args:
            args = (state, *(repeat(a, False) for a in args[1:]))
        else:
            kwargs = {**kwargs, "hidden_states": state}
        return args, {k: v if k == "hidden_states" else repeat(v, False) for k, v in kwargs.items()}

    return hook
