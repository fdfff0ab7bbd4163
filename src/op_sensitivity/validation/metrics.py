"""Quality metrics of a quantized configuration against fp32, teacher-forced on held-out captions.

Each held-out sample is image + prompt + caption; only the caption's own tokens are scored (the
processor's ``target_mask``): the logits at position ``t - 1`` predict caption token ``t``.

Metrics and the damage each one counts (0 for the fp32 model itself):

* ``kl``: mean over caption tokens of KL(fp32 || quantized) of the next-token distributions.
* ``top1``: share of caption tokens where the quantized model's argmax equals fp32's; damage
  ``1 - top1``.
* ``nll``: mean caption negative log-likelihood under the quantized model; damage ``nll -
  nll_fp32``; ``ppl_ratio = exp(damage)``, the perplexity ratio to fp32.
* ``logit_se``: INC's own measure: sum of squared logit differences against fp32 over every
  real (unpadded) position, summed over samples.

The distributions are taken in float64 from the float32 logits. Why: a KL near 1e-6 (the embedded
default's) is a difference of log-probabilities near -6, whose float32 ulp is 5e-7; taken in float32
it moves by about 3e-3 of itself when the logits move by one ulp, and in float64 by about 4e-5
(``tests/validation/test_metrics.py`` measures both). Two runtimes that compute the same logits
to the last bit or two then agree in KL to that, not to the metric's own rounding.

``recovered(config) = 1 - damage(config) / damage(all-int8)``: the share of the all-int8 damage a
configuration gives back (1 = as good as fp32, 0 = no better than all-int8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..phases import METRICS


@dataclass
class Reference:
    """The fp32 model's outputs on one held-out batch, kept to compare every configuration against."""

    logits: torch.Tensor  # [B, T, V] float32, the whole batch (logit_se reads every real position)
    log_probs: torch.Tensor  # [N, V] float64, at the positions that predict caption tokens
    targets: torch.Tensor  # [N] the caption tokens those positions predict
    predict_at: torch.Tensor  # [B, T] bool: position t predicts a caption token (t + 1 is one)
    real: torch.Tensor  # [B, T] bool: attention mask


def reference(
    logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor, attention_mask
) -> Reference:
    logits = logits.float()
    predict_at = torch.zeros_like(target_mask)
    predict_at[:, :-1] = target_mask[:, 1:]
    targets = input_ids[:, 1:][target_mask[:, 1:]]
    log_probs = F.log_softmax(logits[predict_at].double(), dim=-1)
    return Reference(logits, log_probs, targets, predict_at, attention_mask.bool())


def rebase(ref: Reference, logits: torch.Tensor) -> Reference:
    """``ref``'s positions, targets and mask with other logits as the reference."""
    logits = logits.float()
    log_probs = F.log_softmax(logits[ref.predict_at].double(), dim=-1)
    return Reference(logits, log_probs, ref.targets, ref.predict_at, ref.real)


@dataclass
class SampleSums:
    """Per held-out sample, the sums :class:`Totals` adds over the whole split, so any subset of
    samples (a bootstrap resample of the images) scores as if it were measured alone."""

    tokens: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    agree: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    nll_fp32: list[float] = field(default_factory=list)
    logit_se: list[float] = field(default_factory=list)

    def add(
        self,
        ref: Reference,
        kl: torch.Tensor,
        agree: torch.Tensor,
        nll: torch.Tensor,
        nll_fp32: torch.Tensor,
        error: torch.Tensor,
    ) -> None:
        """One batch: the per-token values (rows of ``ref.predict_at``, row-major) and the logit
        error ``[B, T, V]``, summed per sample in float64 (a resample adds up many of them)."""
        batch = ref.predict_at.shape[0]
        rows = ref.predict_at.nonzero()[:, 0]

        def per_sample(values: torch.Tensor) -> list[float]:
            out = torch.zeros(batch, dtype=torch.float64, device=values.device)
            return out.index_add_(0, rows, values.double()).tolist()

        self.tokens += ref.predict_at.sum(1).tolist()
        self.kl += per_sample(kl)
        self.agree += [int(a) for a in per_sample(agree)]
        self.nll += per_sample(nll)
        self.nll_fp32 += per_sample(nll_fp32)
        # one sample at a time: no second logits-sized temporary (the vocabulary is large)
        self.logit_se += [
            float(e[r].pow(2).sum(dtype=torch.float64)) for e, r in zip(error, ref.real, strict=True)
        ]

    def damage(self, metric: str) -> list[float]:
        """Per sample, its share of the split's damage by ``metric`` before the split's division by
        its caption tokens (none for logit_se): a subset's damage ratio is the ratio of its sums."""
        if metric == "kl":
            return list(self.kl)
        if metric == "top1":
            return [float(n - a) for n, a in zip(self.tokens, self.agree, strict=True)]
        if metric == "nll":
            return [q - p for q, p in zip(self.nll, self.nll_fp32, strict=True)]
        return list(self.logit_se)


@dataclass
class Totals:
    """Sums over held-out batches, so a split in several batches scores like one batch; with
    ``per_sample`` (a :class:`SampleSums`) each sample's sums too, the split's own sums untouched."""

    tokens: int = 0
    kl: float = 0.0
    agree: int = 0
    nll: float = 0.0
    nll_fp32: float = 0.0
    logit_se: float = 0.0

    per_sample: SampleSums | None = None  # also each sample's sums (validate's interval), when set

    def add(self, ref: Reference, logits: torch.Tensor) -> None:
        logits = logits.float()
        log_q = F.log_softmax(logits[ref.predict_at].double(), dim=-1)
        p_ref = ref.log_probs.exp()
        kl = p_ref * (ref.log_probs - log_q)  # [N, V]: its sum is the batch's, per sample by row
        agree = log_q.argmax(-1) == ref.log_probs.argmax(-1)
        nll = -log_q.gather(1, ref.targets[:, None])
        nll_fp32 = -ref.log_probs.gather(1, ref.targets[:, None])
        error = logits - ref.logits
        self.tokens += int(ref.targets.numel())
        self.kl += float(kl.sum())
        self.agree += int(agree.sum())
        self.nll += float(nll.sum())
        self.nll_fp32 += float(nll_fp32.sum())
        self.logit_se += float(error[ref.real].pow(2).sum())
        if self.per_sample is not None:
            self.per_sample.add(ref, kl.sum(-1), agree, nll[:, 0], nll_fp32[:, 0], error)

    def values(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        nll, nll_fp32 = self.nll / n, self.nll_fp32 / n
        return {
            "kl": self.kl / n,
            "top1": self.agree / n,
            "nll": nll,
            "nll_fp32": nll_fp32,
            "ppl_ratio": math.exp(nll - nll_fp32),
            "logit_se": self.logit_se,
            "tokens": self.tokens,
        }


def damage(values: dict[str, float], metric: str) -> float:
    """How far ``values`` are from fp32 by ``metric`` (0 = fp32)."""
    if metric == "kl":
        return values["kl"]
    if metric == "top1":
        return 1.0 - values["top1"]
    if metric == "nll":
        return values["nll"] - values["nll_fp32"]
    return values["logit_se"]


def recovered(values: dict[str, float], all_int8: dict[str, float]) -> dict[str, float | None]:
    """Per metric, the share of the all-int8 damage these values give back (None if int8 did no damage)."""
    out: dict[str, float | None] = {}
    for metric in METRICS:
        worst = damage(all_int8, metric)
        out[metric] = 1.0 - damage(values, metric) / worst if worst > 0 else None
    return out
