"""Suffix reuse: a trial that skips unchanged blocks gives the full recompute's values, to the bit."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from op_sensitivity.engines.fakequant import FakeQuantModel
from op_sensitivity.engines.native import run_pass
from op_sensitivity.engines.reuse import SuffixCache, block_stacks
from op_sensitivity.engines.runner import load_inputs
from tests.helpers import sensitivity_params


@pytest.mark.parametrize("requant_mode", ["cumulative", "isolated"])
@pytest.mark.parametrize("arithmetic", ["int8_kernels", "fake_quant"])
def test_suffix_reuse_gives_the_full_recompute_values(
    default_model_dir, calibration_dir, requant_mode, arithmetic
):
    results = {}
    for reuse in (False, True):
        native = replace(
            sensitivity_params().native, arithmetic=arithmetic, requant_mode=requant_mode, suffix_reuse=reuse
        )
        params = sensitivity_params(native=native, confidence_batches=2)
        model, spec, _, _ = load_inputs(
            params, calibration_dir, default_model_dir, default_model_dir.parent / "op_inventory.json"
        )
        results[reuse] = run_pass(model, spec)
        assert not any("forward" in vars(block) for _, block in block_stacks(model))  # hooks removed
    plain, reused = results[False], results[True]
    assert [c.main for c in reused.capture.calls] == [c.main for c in plain.capture.calls]
    assert reused.all_int8_mse == plain.all_int8_mse
    assert plain.runtime["blocks_reused"] == 0
    # 2 decoder layers + 2 vision blocks: only trials of ops past the first block reuse anything
    assert reused.runtime["blocks_reused"] > 0 and reused.runtime["blocks_run"] > 0


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h):
        return h + torch.tanh(self.fc(h))


class _OutOfOrder(nn.Module):
    """``pre`` is defined after the blocks but runs before them: module order is not forward order."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(3))
        self.pre = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.pre(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_prefixes_follow_the_forward_not_the_module_order():
    torch.manual_seed(0)
    model, x = _OutOfOrder().eval(), torch.randn(5, 8) * 3
    ops = ["layers.0.fc", "layers.1.fc", "layers.2.fc", "pre", "head"]
    fq = FakeQuantModel(model, ops, reduce_range=False, arithmetic="fake_quant")
    batch_key = [0]
    cache = SuffixCache(model, fq, batch_key)
    with torch.no_grad(), cache.learn():
        fq.calibrate([{"x": x}])
    assert cache.prefix["layers.0"] == ["pre", "layers.0.fc"]
    assert cache.prefix["layers.2"] == ["pre", "layers.0.fc", "layers.1.fc", "layers.2.fc"]
    states = [set(), set(ops), {"layers.2.fc"}, {"pre"}, {"pre", "layers.1.fc"}, set(ops) - {"pre"}]
    actual = []
    with torch.no_grad():
        for on in states:
            for name in ops:
                fq.set(name, name in on)
            actual.append(model(x=x))
        cache.remove()
        for on, got in zip(states, actual, strict=True):
            for name in ops:
                fq.set(name, name in on)
            assert torch.equal(got, model(x=x)), on
    assert cache.hits > 0
    fq.remove()
