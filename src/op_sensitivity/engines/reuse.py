"""What a native trial need not recompute: outputs that no toggled op can have changed.

Why: a trial toggles one op, yet a plain forward recomputes the whole model. Two caches skip
the unchanged part, both keyed by the confidence batch and the on/off state of the ops that ran
before, so a hit is the very tensor a recompute would give (deterministic kernels, same inputs):

* :func:`vision_cache`: the vision tower's output while no vision op changed (text-op trials).
* :class:`SuffixCache` (``sensitivity.native.suffix_reuse``): each block's output - a decoder
  layer, a vision block - while no op that ran before the block's end changed, so a trial
  recomputes from the toggled op's block onward. The prefixes are learned from the order the
  ops run in one forward (:meth:`SuffixCache.learn`), not from module names, so a model that
  defines modules out of forward order is still right (only slower where it is conservative).

Each block keeps its outputs for the last two op states it computed (first in, first out):
the phase's base state (all int8 for ``fallback``, all fp32 for ``requant``) and the newest,
which is what the cumulative requant curve reuses. Memory: two hidden states per block, e.g.
about 0.5 GB for the full-size 3B and one 448x448 sample.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol

from torch import nn

STACK_NAMES = ("layers", "blocks")  # ModuleLists of repeated blocks (decoder layers, vision blocks)
SLOTS = 2


class Toggles(Protocol):
    """What the caches read of a ``FakeQuantModel``."""

    ops: dict
    observing: bool
    trace: list[str] | None

    def state(self, names: list[str]) -> tuple[bool | None, ...]: ...


def vision_tower(model: nn.Module) -> nn.Module | None:
    return getattr(getattr(model, "model", model), "visual", None)


@contextlib.contextmanager
def vision_cache(model: nn.Module, fq: Toggles, batch_key: list[int]) -> Iterator[dict]:
    """Reuse the vision tower's output while its fake-quant state does not change."""
    visual = vision_tower(model)
    cache: dict = {}
    if visual is None:
        yield cache
        return
    vision_ops = [n for n in fq.ops if n.startswith(("model.visual.", "visual."))]
    original = visual.forward

    def forward(*args, **kwargs):
        if getattr(fq, "probe", None) is not None:  # a gradient sweep: no stored tensor carries its graph
            return original(*args, **kwargs)
        key = (batch_key[0], fq.state(vision_ops))
        if key not in cache:
            cache.clear()  # one entry: bounded memory
            cache[key] = original(*args, **kwargs)
        return copy.copy(cache[key])  # callers reassign fields of the output object

    visual.forward = forward
    try:
        yield cache
    finally:
        del visual.forward


def block_stacks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every block of every stack (``*.layers``, ``*.blocks`` ModuleLists), in module order."""
    return [
        (f"{name}.{i}", block)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in STACK_NAMES
        for i, block in enumerate(module)
    ]


class SuffixCache:
    """Per-block outputs of recent op states; a block whose prefix state matches is not run.

    Use: ``learn`` during one plain forward, then every forward of the same batch reuses what it
    can. ``record`` off keeps the stored states (the base) while trials that will not recur run.
    """

    def __init__(self, model: nn.Module, fq: Toggles, batch_key: list[int]):
        self.fq = fq
        self.batch_key = batch_key
        self.blocks = block_stacks(model)
        self.prefix: dict[str, list[str]] = {}
        self.entries: dict[str, OrderedDict] = {name: OrderedDict() for name, _ in self.blocks}
        self.record = True
        self.hits = 0
        self.runs = 0
        self._learning = False
        for name, block in self.blocks:
            block.forward = self._forward(name, block.forward)

    def _forward(self, name: str, original: Callable) -> Callable:
        def forward(*args, **kwargs):
            if getattr(self.fq, "probe", None) is not None:  # a gradient sweep recomputes everything
                return original(*args, **kwargs)
            if self._learning or self.fq.observing or name not in self.prefix:
                out = original(*args, **kwargs)
                if self._learning:
                    self.prefix[name] = list(dict.fromkeys(self.fq.trace))
                if self.fq.observing and self.record and name in self.prefix:
                    # a calibration forward computes the fp32 model's outputs: the requant base
                    self._store(
                        self.entries[name], (self.batch_key[0], self.fq.state(self.prefix[name])), out
                    )
                return out
            key = (self.batch_key[0], self.fq.state(self.prefix[name]))
            slots = self.entries[name]
            if key in slots:
                self.hits += 1
                return slots[key]
            self.runs += 1
            out = original(*args, **kwargs)
            if self.record and None not in key[1]:  # None: batched trials (their rows are not one state)
                self._store(slots, key, out)
            return out

        return forward

    @staticmethod
    def _store(slots: OrderedDict, key: tuple, out) -> None:
        slots[key] = out
        while len(slots) > SLOTS:
            slots.popitem(last=False)

    @contextlib.contextmanager
    def learn(self) -> Iterator[None]:
        """Record, for each block, the scored ops that have run when it ends (its prefix)."""
        self.fq.trace, self._learning = [], True
        try:
            yield
        finally:
            self.fq.trace, self._learning = None, False

    def clear(self) -> None:
        """A new batch: nothing stored applies (the key has the batch too; this frees memory)."""
        for slots in self.entries.values():
            slots.clear()

    def remove(self) -> None:
        for _, block in self.blocks:
            if "forward" in vars(block):
                del block.forward
        self.clear()
