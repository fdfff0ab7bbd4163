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

``recovered(config) = 1 - damage(config) / damage(all-int8)``: the share of the all-int8 damage a
configuration gives back (1 = as good as fp32, 0 = no better than all-int8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..phases import METRICS


@dataclass
class Reference:
    """The fp32 model's outputs on one held-out batch, kept to compare every configuration against."""

    logits: torch.Tensor  # [B, T, V] float32, the whole batch (logit_se reads every real position)
    log_probs: torch.Tensor  # [N, V] at the positions that predict caption tokens
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
    log_probs = F.log_softmax(logits[predict_at], dim=-1)
    return Reference(logits, log_probs, targets, predict_at, attention_mask.bool())


@dataclass
class Totals:
    """Sums over held-out batches, so a split in several batches scores like one batch."""

    tokens: int = 0
    kl: float = 0.0
    agree: int = 0
    nll: float = 0.0
    nll_fp32: float = 0.0
    logit_se: float = 0.0

    def add(self, ref: Reference, logits: torch.Tensor) -> None:
        logits = logits.float()
        log_q = F.log_softmax(logits[ref.predict_at], dim=-1)
        p_ref = ref.log_probs.exp()
        self.tokens += int(ref.targets.numel())
        self.kl += float((p_ref * (ref.log_probs - log_q)).sum())
        self.agree += int((log_q.argmax(-1) == ref.log_probs.argmax(-1)).sum())
        self.nll += float(-log_q.gather(1, ref.targets[:, None]).sum())
        self.nll_fp32 += float(-ref.log_probs.gather(1, ref.targets[:, None]).sum())
        self.logit_se += float((logits - ref.logits)[ref.real].pow(2).sum())

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
