import math

import pytest
import torch

from op_sensitivity.validation.metrics import SampleSums, Totals, damage, recovered, reference


def _ref():
    # one sample, 4 tokens, vocab 3; tokens 2 and 3 are the caption (predicted from positions 1 and 2)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])
    input_ids = torch.tensor([[0, 1, 0, 1]])
    mask = torch.tensor([[False, False, True, True]])
    return logits, reference(logits, input_ids, mask, torch.ones(1, 4))


def test_fp32_against_itself_is_no_damage():
    logits, ref = _ref()
    t = Totals()
    t.add(ref, logits)
    v = t.values()
    assert v["tokens"] == 2 and v["kl"] == 0 and v["top1"] == 1 and v["logit_se"] == 0
    # NLL of token 0 after position 1 (logits 2,0,0) and token 1 after position 2 (0,3,0)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(math.exp(3) / (math.exp(3) + 2))) / 2
    assert v["nll"] == pytest.approx(expected) and v["ppl_ratio"] == 1.0
    assert all(damage(v, m) == 0 for m in ("kl", "top1", "nll", "logit_se"))


def test_a_changed_prediction_is_counted_by_every_metric():
    logits, ref = _ref()
    q = logits.clone()
    q[0, 1] = torch.tensor([0.0, 2.0, 0.0])  # position 1 now predicts token 1, not 0
    q[0, 0, 0] = 1.0  # position 0 predicts no caption token: only the logit error sees it
    t = Totals()
    t.add(ref, q)
    v = t.values()
    assert v["top1"] == 0.5
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    kl = float((p * (p.log() - torch.log_softmax(torch.tensor([0.0, 2.0, 0.0]), 0))).sum()) / 2
    assert v["kl"] == pytest.approx(kl)
    assert v["logit_se"] == pytest.approx(2**2 + 2**2 + 1)
    assert v["ppl_ratio"] > 1
    half = {
        **v,
        "kl": v["kl"] / 2,
        "logit_se": v["logit_se"] / 4,
        "top1": 0.75,
        "nll": (v["nll"] + v["nll_fp32"]) / 2,
    }
    rec = recovered(half, v)
    assert rec["kl"] == pytest.approx(0.5) and rec["logit_se"] == pytest.approx(0.75)
    assert rec["top1"] == pytest.approx(0.5) and rec["nll"] == pytest.approx(0.5)
    assert recovered(v, {**v, "kl": 0.0})["kl"] is None  # int8 did no damage: nothing to give back


def _two_samples():
    # two samples of 4 tokens, vocab 3; sample 0 scores tokens 2-3, sample 1 tokens 1-3
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]],
            [[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [0.5, 0.0, 3.0], [0.0, 1.0, 0.0]],
        ]
    )
    input_ids = torch.tensor([[0, 1, 0, 1], [2, 1, 2, 0]])
    mask = torch.tensor([[False, False, True, True], [False, True, True, True]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    q = logits + torch.tensor([[0.0, 1.5, -1.0], [0.3, 0.0, 0.0], [0.0, -2.0, 0.0], [1.0, 0.0, 0.0]])
    return logits, input_ids, mask, attention, q


def test_per_sample_sums_add_up_to_the_split_and_leave_it_unchanged():
    """The split's sums are the same to the bit with per-sample sums on; each sample's sums are
    what that sample measured alone gives."""
    logits, input_ids, mask, attention, q = _two_samples()
    ref = reference(logits, input_ids, mask, attention)
    plain, per = Totals(), Totals(per_sample=SampleSums())
    plain.add(ref, q)
    per.add(ref, q)
    assert per.values() == plain.values()
    sums = per.per_sample
    assert sums.tokens == [2, 3] and len(sums.kl) == len(sums.logit_se) == 2
    for i in range(2):
        alone = Totals()
        alone.add(
            reference(logits[i : i + 1], input_ids[i : i + 1], mask[i : i + 1], attention[i : i + 1]),
            q[i : i + 1],
        )
        assert sums.tokens[i] == alone.tokens and sums.agree[i] == alone.agree
        for name in ("kl", "nll", "nll_fp32", "logit_se"):
            assert getattr(sums, name)[i] == pytest.approx(getattr(alone, name), rel=1e-6), name
    assert sum(sums.kl) == pytest.approx(plain.kl, rel=1e-6)
    assert sums.damage("top1") == [float(n - a) for n, a in zip(sums.tokens, sums.agree, strict=True)]
    assert sums.damage("nll") == [a - b for a, b in zip(sums.nll, sums.nll_fp32, strict=True)]
    assert sums.damage("kl") == sums.kl and sums.damage("logit_se") == sums.logit_se


def test_kl_near_1e_6_moves_by_its_logits_last_bits_not_by_its_own_rounding():
    """The docstring's figures: logits one or two ulp apart move a KL of ~2e-6 by ~4e-5 of itself in
    float64 (what Totals computes), where float32 log-probabilities move it by ~3e-3."""
    torch.manual_seed(0)
    fp32 = torch.randn(1, 54, 388) * 2
    quant = fp32 + torch.randn_like(fp32) * 2e-3
    ulps = quant + quant.abs() * torch.randn_like(quant) * 1.2e-7  # the last bits, as a runtime's may
    mask = torch.ones(1, 54, dtype=torch.bool)
    ref = reference(fp32, torch.zeros(1, 54, dtype=torch.long), mask, torch.ones(1, 54))

    def kl(logits: torch.Tensor) -> float:
        t = Totals()
        t.add(ref, logits)
        return t.values()["kl"]

    def kl32(logits: torch.Tensor) -> float:
        p, q = (torch.log_softmax(x[0, :-1], -1) for x in (fp32, logits))
        return float((p.exp() * (p - q)).sum(-1).mean())

    assert 1e-6 < kl(quant) < 3e-6
    assert abs(kl(ulps) / kl(quant) - 1) < 2e-4
    assert abs(kl32(ulps) / kl32(quant) - 1) > 1e-3  # float32's own rounding, what it avoids
