"""Measure any keep-list on a held-out split: calibrate once, then toggle ops per configuration.

The quantization is the sensitivity pass's (the native engine's ``FakeQuantModel`` with INC's
scheme and ``sensitivity.native``'s numerics), with one difference that makes it what a real
PTQ run does: the observers are calibrated once over the whole calibration sample, not per
confidence batch. A configuration is the set of ops kept in high precision; every other scored
op is int8, ops the sensitivity params keep fp32 stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import astuple

import torch
from torch import nn

from ..engines.fakequant import FakeQuantModel
from ..engines.numerics import Numerics
from .metrics import Reference, SampleSums, Totals, rebase, reference

EvalBatch = tuple[dict[str, torch.Tensor], torch.Tensor]  # model inputs, caption target mask
CALIBRATION, SELECTION, TEST = "calibration", "selection", "test"
HELD_OUT = (SELECTION, TEST)  # a measurer holds the calibration split and one of these


class Scorer:
    """A split's model inputs and their fp32 references: scores any forward's logits against them."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], refs: list[Reference]):
        self.batches, self.refs = batches, refs

    def cpu(self) -> Scorer:
        """The same on the CPU, for a runtime that runs there (the measurer may be on a GPU)."""
        refs = [Reference(*(t.cpu() for t in astuple(r))) for r in self.refs]
        return Scorer([{k: v.cpu() for k, v in b.items()} for b in self.batches], refs)

    def score(self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> dict[str, float]:
        return self.totals(forward).values()

    @torch.no_grad()
    def against(self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> Scorer:
        """The same split with ``forward``'s logits as the reference instead of fp32's: what one
        runtime differs from another by (a deployment target's cause, ``quantize.causes``)."""
        refs = [rebase(r, forward(b)) for b, r in zip(self.batches, self.refs, strict=True)]
        return Scorer(self.batches, refs)

    @torch.no_grad()
    def totals(
        self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], per_sample: bool = False
    ) -> Totals:
        """The split's sums; ``per_sample``: each sample's too (an interval over the split's images
        needs them), the split's own sums, and so :meth:`score`, the same to the bit."""
        totals = Totals(per_sample=SampleSums() if per_sample else None)
        for batch, ref in zip(self.batches, self.refs, strict=True):
            totals.add(ref, forward(batch))
        return totals


class Measurer(AbstractContextManager):
    """One calibrated model; :meth:`measure` scores a configuration against the fp32 reference.

    Two splits: ``calibration`` (the observers are calibrated on all of it; per-op damage that
    ranks ops is measured on it, so no ranking has seen held-out data) and one held-out split,
    :attr:`held_out`: ``selection`` for the curve stage (every curve point, which the measured
    policies choose from) or ``test`` for validate (the chosen list, the random lists and the
    rankings' crossings, on images neither the calibration nor the choice used).

    ``images``: per split, the image id of each sample in order (several captions of one image are
    several samples); a split not given counts each sample as its own image (:meth:`images`).
    """

    def __init__(
        self,
        model: nn.Module,
        scored: list[str],
        numerics: Numerics,
        splits: dict[str, list[EvalBatch]],
        kept: list[str] = (),
        images: dict[str, list[int]] | None = None,
    ):
        self.numerics = numerics
        self.image_ids = dict(images or {})
        self.scored = list(scored)
        self.model = numerics.prepare(model, {*self.scored, *kept})
        self.fq = FakeQuantModel(
            self.model,
            self.scored,
            numerics.reduce_range,
            numerics.arithmetic,
            numerics.dtype,
            list(kept),
            numerics.scheme,
        )
        self.splits = {
            name: [(numerics.batch(b), m.to(numerics.device)) for b, m in batches]
            for name, batches in splits.items()
        }
        held_out = [name for name in self.splits if name != CALIBRATION]
        if CALIBRATION not in self.splits or len(held_out) != 1 or held_out[0] not in HELD_OUT:
            raise ValueError(f"expected the calibration split and one of {HELD_OUT}, got {list(self.splits)}")
        self.held_out = held_out[0]
        self.calibration = [b for b, _ in self.splits[CALIBRATION]]
        with torch.no_grad():
            self.fq.calibrate(self.calibration)
            self.fq.set_all(False)
            self.refs = {
                name: [
                    reference(self.model(**b).logits, b["input_ids"], m, b["attention_mask"])
                    for b, m in batches
                ]
                for name, batches in self.splits.items()
            }

    def measure(self, keep: Iterable[str], split: str | None = None) -> dict[str, float]:
        """All scored ops int8 except ``keep``; the split's metrics against fp32 (default: held-out)."""
        return self.measure_totals(keep, split).values()

    def measure_totals(
        self, keep: Iterable[str], split: str | None = None, per_sample: bool = False
    ) -> Totals:
        """As :meth:`measure`, the sums behind the metrics; ``per_sample``: each sample's too
        (validate's interval over the test images), the split's metrics the same to the bit."""
        keep = set(keep)
        unknown = keep - set(self.scored)
        if unknown:
            raise ValueError(f"not scored ops: {sorted(unknown)[:5]}")
        for name in self.scored:
            self.fq.set(name, name not in keep)
        return self.scorer(split).totals(lambda batch: self.model(**batch).logits, per_sample)

    def measure_forward(
        self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], split: str | None = None
    ) -> dict[str, float]:
        """Score any model's logits (e.g. a real quantizer's output model) on a split (default: held-out)."""
        return self.scorer(split).score(forward)

    def scorer(self, split: str | None = None) -> Scorer:
        """The split's inputs and fp32 references, which outlive the measurer: a model too large to
        sit beside it in memory (a deployed artifact) is scored after the measurer is released."""
        split = split or self.held_out
        return Scorer([b for b, _ in self.splits[split]], self.refs[split])

    def samples(self, split: str | None = None) -> int:
        return sum(len(b["input_ids"]) for b, _ in self.splits[split or self.held_out])

    def images(self, split: str | None = None) -> list[int]:
        """The image of each sample of the split, in order: what an interval resamples (the
        captions of one image are not independent draws); each sample its own where not given."""
        split = split or self.held_out
        ids = self.image_ids.get(split, list(range(self.samples(split))))
        if len(ids) != self.samples(split):
            raise ValueError(f"{len(ids)} image ids for {self.samples(split)} samples of the {split} split")
        return list(ids)

    def __exit__(self, *exc) -> None:
        self.fq.remove()
