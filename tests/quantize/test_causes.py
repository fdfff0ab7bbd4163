"""The bar a target derives from the causes of its gap (``quantize.causes``): the bound itself, on
vectors where it is exact and on softmax KLs where it is second order."""

import math

import pytest
import torch
import torch.nn.functional as F

from op_sensitivity.quantize.causes import Cause, derived_bar, gap_bound


def _se(v: torch.Tensor) -> float:
    return float(v.pow(2).sum())


def test_the_bound_holds_for_squared_error_and_is_attained_by_an_aligned_cause():
    """logit_se: measured ||a + b||^2, predicted ||a||^2, the cause's own ||b||^2. The bound is never
    exceeded (400 random pairs at sizes from 1e-3 to 1e3 of the prediction) and is met exactly when
    b points along a: so it cannot be made smaller."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for i in range(400):
        a = torch.randn(64, generator=gen, dtype=torch.float64)
        b = torch.randn(64, generator=gen, dtype=torch.float64) * 10 ** (i % 7 - 3) / 8
        p, k, m = _se(a), _se(b), _se(a + b)
        bound = gap_bound(p, [Cause("c", k, "")])
        assert abs(m - p) <= bound * (1 + 1e-12)
        worst = max(worst, abs(m - p) / bound)
    assert worst < 1.0  # random directions stay inside
    a = torch.randn(64, generator=gen, dtype=torch.float64)
    b = 0.3 * a
    assert _se(a + b) - _se(a) == pytest.approx(gap_bound(_se(a), [Cause("c", _se(b), "")]), rel=1e-12)


def test_several_causes_add_under_the_square_root():
    """Two causes b1, b2 with ||b1 + b2|| <= ||b1|| + ||b2||: the bound takes sqrt K as the sum."""
    a, b1, b2 = torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.0]), torch.tensor([0.1, 0.0])
    causes = [Cause("1", _se(b1), ""), Cause("2", _se(b2), "")]
    assert _se(a + b1 + b2) - _se(a) == pytest.approx(gap_bound(_se(a), causes), rel=1e-6)
    assert gap_bound(_se(a), causes) > gap_bound(_se(a), causes[:1]) + gap_bound(_se(a), causes[1:]) - 1e-9


def _kl(ref: torch.Tensor, logits: torch.Tensor) -> float:
    p = F.log_softmax(ref, -1)
    return float((p.exp() * (p - F.log_softmax(logits, -1))).sum())


def test_the_bound_holds_for_kl_to_second_order():
    """KL of softmaxes, perturbations a (the quantization) and b (a cause) of 1e-3 to 1e-1 of the
    logits' scale: |KL(r || r+a+b) - KL(r || r+a)| within the bound to a few percent (third order),
    and an aligned b comes within 10 % of it."""
    gen = torch.Generator().manual_seed(1)
    for scale in (1e-3, 1e-2, 1e-1):
        for _ in range(50):
            r = torch.randn(200, generator=gen, dtype=torch.float64) * 3
            a = torch.randn(200, generator=gen, dtype=torch.float64) * scale
            b = torch.randn(200, generator=gen, dtype=torch.float64) * scale / 3
            p, k, m = _kl(r, r + a), _kl(r, r + b), _kl(r, r + a + b)
            assert abs(m - p) <= gap_bound(p, [Cause("c", k, "")]) * (1 + 3 * scale)
        b = 0.5 * a
        p, k, m = _kl(r, r + a), _kl(r, r + b), _kl(r, r + a + b)
        assert m - p == pytest.approx(gap_bound(p, [Cause("c", k, "")]), rel=0.1)


def test_the_bar_is_the_floor_plus_the_bound_over_the_prediction():
    cause = Cause("stored dtype bfloat16", 4e-4, "how")
    got = derived_bar("kl", 1e-3, 0.01, [cause])
    assert got["bar"] == pytest.approx(1e-3 + (4e-4 + 2 * math.sqrt(0.01 * 4e-4)) / 0.01)
    assert got["floor"] == 1e-3 and got["bound"] == pytest.approx(4e-4 + 2 * math.sqrt(4e-6))
    assert got["causes"] == [{"name": "stored dtype bfloat16", "value": 4e-4, "how": "how"}]
    assert derived_bar("kl", 1e-3, 0.01, [])["bar"] == 1e-3  # no cause: the floor
    top1 = derived_bar("top1", 1e-3, 0.9, [cause])  # no bound for top1: the floor, said so
    assert top1["bar"] == 1e-3 and "no bound for top1" in top1["derivation"]
    assert derived_bar("kl", 1e-3, 0.0, [cause])["bar"] == 1e-3  # relative to 0: within means equal
