"""engines.weight_copies: one reused buffer per shape for the per-call weight copies, the same values,
and never a buffer that someone still holds or that autograd could keep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from op_sensitivity.engines.fakequant import FakeQuantModel
from op_sensitivity.engines.first_order import estimate_batch
from op_sensitivity.engines.weight_copies import WeightCopies
from op_sensitivity.schemes import load
from op_sensitivity.schemes.qdq import dequantize, observe, qparams, quantize


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_copies_of_one_shape_share_one_buffer_with_the_values_of_to():
    copies, a, b = WeightCopies(), _bf16(64, 32, seed=0), _bf16(64, 32, seed=1)
    with torch.no_grad():
        first = copies.upcast(a, torch.float32)
        assert torch.equal(first, a.to(torch.float32))
        ptr = first.data_ptr()
        del first
        second = copies.upcast(b, torch.float32)
    assert second.data_ptr() == ptr  # the same memory, written again
    assert torch.equal(second, b.to(torch.float32))
    assert (copies.reused, copies.fresh) == (2, 0)
    same = torch.ones(3)
    assert copies.upcast(same, torch.float32) is same  # stored in the compute dtype: no copy at all


def test_a_buffer_still_held_is_never_written_again():
    copies, a, b = WeightCopies(), _bf16(64, 32, seed=0), _bf16(64, 32, seed=1)
    with torch.no_grad():
        held = copies.upcast(a, torch.float32)
        other = copies.upcast(b, torch.float32)
    assert other.data_ptr() != held.data_ptr()
    assert torch.equal(held, a.to(torch.float32)) and torch.equal(other, b.to(torch.float32))
    assert (copies.reused, copies.fresh) == (1, 1)


def test_no_buffer_while_autograd_records():
    """Autograd would keep the buffer for the backward and the next call would overwrite it."""
    copies, a = WeightCopies(), _bf16(64, 32, seed=0)
    with torch.enable_grad():
        fresh = copies.upcast(a, torch.float32)
    assert copies.buffers == {} and (copies.reused, copies.fresh) == (0, 0)
    assert torch.equal(fresh, a.to(torch.float32))


# every scheme's weights (symmetric: a multiplier, or fp8), and an asymmetric spec (scale and zero
# point: ONNX Runtime's activations), so each in-place branch of dequantize is held to its out-of-place one
SPECS = [(s, "weights") for s in ("modelopt_int8", "modelopt_fp8", "llmcompressor_w8a8", "ort_qdq")]


@pytest.mark.parametrize(("scheme", "role"), [*SPECS, ("ort_qdq", "inputs")])
def test_dequantized_in_a_buffer_equals_the_out_of_place_values(scheme, role):
    spec = getattr(load(scheme), role)
    if role == "inputs":
        assert not spec.symmetric  # the zero-point branch
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(3)) * 3
    qp = qparams(spec, *observe(w, spec))
    codes = quantize(w, qp)
    copies = WeightCopies()
    with torch.no_grad():
        for _ in range(2):  # the second call writes into the buffer the first made
            got = copies.dequantized(codes, qp, torch.float32)
            assert torch.equal(got, dequantize(codes, qp, torch.float32))
            del got
    assert copies.reused == 2


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 12)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def _sweep(buffers: bool, monkeypatch) -> tuple[list, list, list, int]:
    """A bf16 model's reference, a trial and a gradient sweep, with or without buffers."""
    if not buffers:
        monkeypatch.setattr(WeightCopies, "_buffer", lambda *a: None)
    torch.manual_seed(0)
    model = _Chain()
    for m in (model.a, model.b, model.c):
        m.weight.data = m.weight.data.to(torch.bfloat16)  # as a bf16 checkpoint stores them
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    fq = FakeQuantModel(model, ["a", "c"], reduce_range=False, arithmetic="fake_quant", kept=["b"])
    fq.calibrate([{"x": x}])
    with torch.no_grad():
        fq.set_all(False)
        ref = model(x).float()
        fq.set("a", True)
        trial = model(x)
    est = estimate_batch(fq, lambda: model(x).float(), ref, ["a", "c"], points=2, probes=2, seed=0)
    monkeypatch.undo()
    return ref.tolist(), trial.tolist(), [est.fallback, est.requant, est.first_order], fq.copies.reused


def test_the_engine_computes_the_same_values_with_its_buffers(monkeypatch):
    """Trials (no autograd) and a gradient sweep (the backward's upcast, under _UpcastLinear):
    bit for bit the values of fresh copies, and the buffers are used."""
    with_buffers, fresh = _sweep(True, monkeypatch), _sweep(False, monkeypatch)
    assert with_buffers[:3] == fresh[:3]
    assert with_buffers[3] > 0 and fresh[3] == 0
