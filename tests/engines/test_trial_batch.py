"""Batched trials: T trials in one forward give each trial's value of one forward per trial, to the bit."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from op_sensitivity.engines.fakequant import FakeQuantModel
from op_sensitivity.engines.numerics import resolve_numerics
from op_sensitivity.engines.reuse import SuffixCache, vision_cache
from op_sensitivity.engines.runner import load_inputs
from op_sensitivity.engines.trial_batch import decoder_layers, fallback_states, plan, run_trials
from tests.helpers import sensitivity_params
from tests.threads import torch_threads


class Trials:
    """The native pass loop's state at the fallback phase, built from its parts: the model
    calibrated on one batch, its float32 reference, the all-int8 base set and stored."""

    def __init__(
        self,
        model_dir,
        calibration_dir,
        arithmetic: str,
        batch_size: int,
        suffix_reuse: bool,
        scheme: str = "inc_cpu",
    ):
        native = replace(
            sensitivity_params().native,
            arithmetic=arithmetic,
            suffix_reuse=suffix_reuse,
            device="cpu",
            scheme=scheme,
        )
        params = sensitivity_params(native=native, batch_size=batch_size, engine="native")
        model, spec, _, _ = load_inputs(
            params, calibration_dir, model_dir, model_dir.parent / "op_inventory.json"
        )
        num = resolve_numerics(params)
        self.scored = [name for name, _ in spec.scored]
        kept = [e.op_name for e in spec.excluded]
        self.model = num.prepare(model, {*self.scored, *kept})
        self.fq = FakeQuantModel(
            self.model, self.scored, num.reduce_range, num.arithmetic, num.dtype, kept, num.scheme
        )
        self.head = spec.module_order[-1]
        self.captured: dict[str, torch.Tensor] = {}
        self.grab = dict(self.model.named_modules())[self.head].register_forward_hook(
            lambda _m, _a, out: self.captured.__setitem__("out", out.detach())
        )
        self.batch = num.batch(spec.batches[0])
        self.suffix = SuffixCache(self.model, self.fq, [0]) if suffix_reuse else None
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(torch.no_grad())
        self.stack.enter_context(vision_cache(self.model, self.fq, [0]))
        with self.suffix.learn() if self.suffix is not None else contextlib.nullcontext():
            self.fq.calibrate([self.batch])
        self.fq.set_all(False)
        self.ref = self.forward()
        self.fq.set_all(True)
        self.forward()  # the all-int8 base, stored
        if self.suffix is not None:
            self.suffix.record = False

    def forward(self) -> torch.Tensor:
        self.model(**self.batch)
        return self.captured["out"].float()

    def single(self, state: dict[str, bool]) -> float:
        """One trial, one forward, as the pass loop measures it."""
        before = {name: self.fq.ops[name].enabled for name in state}
        for name, on in state.items():
            self.fq.set(name, on)
        value = float((self.forward() - self.ref).pow(2).sum())
        for name, on in before.items():
            self.fq.set(name, on)
        return value

    def batched(self, states: list[dict[str, bool]]) -> list[float]:
        return run_trials(self.model, self.fq, self.forward, self.ref, states, self.head)

    def ops_from_layer(self, last: int) -> list[str]:
        """The scored ops of the last ``last`` decoder layers, and the head where it is scored."""
        layers = decoder_layers(self.model)[-last:]
        return [n for n in self.scored if n == self.head or any(n.startswith(f"{x}.") for x in layers)]

    def close(self) -> None:
        self.stack.close()
        self.grab.remove()
        if self.suffix is not None:
            self.suffix.remove()
        self.fq.remove()


@pytest.fixture
def trials(request, default_model_dir, calibration_dir):
    t = Trials(default_model_dir, calibration_dir, *request.param)
    yield t
    t.close()


CASES = [
    ("fake_quant", 1, True),
    ("int8_kernels", 1, True),
    ("fake_quant", 2, True),
    ("int8_kernels", 2, True),
    ("int8_kernels", 2, False),
]


@pytest.mark.parametrize("trials", CASES, indirect=True, ids=["-".join(map(str, c)) for c in CASES])
def test_batched_fallback_trials_equal_one_forward_each(trials):
    last_layer, last_two = trials.ops_from_layer(1), trials.ops_from_layer(2)
    assert trials.head in last_layer and len(last_two) > len(last_layer) > 1
    single = {name: trials.single({name: False}) for name in last_two}
    base_entries = None if trials.suffix is None else {k: dict(v) for k, v in trials.suffix.entries.items()}
    picks = [
        last_layer[:1],  # T = 1
        [last_two[0], last_layer[1], trials.head],  # T = 3, across both layers and the head
        [trials.head],  # the head alone: batched from lm_head's input
        last_layer,
        last_two,
    ]
    assert len(set(single.values())) == len(single)  # every trial measures something of its own
    for names in picks:
        hits = trials.suffix.hits if trials.suffix is not None else 0
        got = trials.batched(fallback_states(names))
        assert got == [single[n] for n in names], names
        if trials.suffix is not None and names == last_layer:
            assert trials.suffix.hits > hits  # the first layer came from the store, not recomputed
    # nothing left behind: flags, per-trial state, stored block outputs, and a plain trial's value
    assert all(op.enabled and op.per_trial is None for op in trials.fq.ops.values())
    assert trials.fq.trial_count is None
    if trials.suffix is not None:
        assert {k: dict(v) for k, v in trials.suffix.entries.items()} == base_entries
    assert trials.single({last_two[0]: False}) == single[last_two[0]]


@pytest.mark.parametrize("arithmetic", ["fake_quant", "int8_kernels"])
def test_batched_trials_equal_one_forward_each_on_1_and_2_threads(
    arithmetic, default_model_dir, calibration_dir
):
    """The module's "1 and 2 threads", in the default run: ``make test``'s xdist workers run torch
    on one thread (conftest), so the cases above never see 2; here each count is set (and given
    back), the pass state built under it, and every trial of the last two layers and the head,
    batched with B = 2, equals its one-forward value to the bit."""
    for threads in (1, 2):
        with torch_threads(threads):
            assert torch.get_num_threads() == threads
            t = Trials(default_model_dir, calibration_dir, arithmetic, 2, True)
            try:
                names = t.ops_from_layer(2)
                single = [t.single({n: False}) for n in names]
                assert len(set(single)) == len(single)  # each trial measures something of its own
                assert t.batched(fallback_states(names)) == single, f"{threads} threads"
            finally:
                t.close()


@pytest.mark.parametrize("trials", [("fake_quant", 2, True)], indirect=True)
def test_trials_of_several_ops_and_refusals(trials):
    """A trial may set several ops (either way); an op outside the decoder layers is refused."""
    a, b, c = trials.ops_from_layer(2)[:3]
    states = [{a: False, b: False}, {c: False}, {a: False, trials.head: False}]
    assert trials.batched(states) == [trials.single(s) for s in states]
    states = [{a: False}, {b: False}, {a: False}, {}]  # a: off in trials 0 and 2, on in 1 and 3 (a gather)
    assert trials.batched(states) == [trials.single(s) for s in states]
    assert trials.batched([{}, {}]) == [trials.single({})] * 2
    trials.fq.set_all(False)
    states = [{a: True}, {b: True, c: True}]
    assert trials.batched(states) == [trials.single(s) for s in states]
    trials.fq.set_all(True)
    vision = next(n for n in trials.scored if ".visual." in f".{n}")
    with pytest.raises(ValueError, match="not batchable"):
        trials.batched(fallback_states([vision, a]))
    assert all(op.per_trial is None for op in trials.fq.ops.values())


@pytest.mark.parametrize(
    "trials",
    [("fake_quant", 2, True, "ort_qdq"), ("int8_kernels", 2, True, "llmcompressor_w8a8")],
    indirect=True,
    ids=["ort_qdq", "llmcompressor_w8a8"],
)
def test_schemes_batch_to_the_bit(trials):
    """Another scheme's path: a shared input quantizer (ONNX Runtime) is on in exactly the trials
    where a co-reader is int8; per-token dynamic scales (compressed-tensors) stay per row."""
    names = trials.ops_from_layer(2)
    assert trials.batched(fallback_states(names)) == [trials.single({n: False}) for n in names]


class _Layer(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(hidden, inner), nn.SiLU(), nn.Linear(inner, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(self.act(self.up(h)))


class _Stack(nn.Module):
    """A decoder-like stack whose MLP width puts a trial's SiLU elements off the 32-float grid."""

    def __init__(self, hidden: int = 8, inner: int = 20, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(hidden, inner) for _ in range(layers))
        self.head = nn.Linear(hidden, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.mark.parametrize("arithmetic", ["fake_quant", "int8_kernels"])
def test_activations_run_per_trial_where_the_cpu_loops_would_split_differently(arithmetic):
    """504 SiLU elements per trial, not a multiple of 32: batched, a trial's elements would take
    the other (vector / scalar) code path of torch's CPU loop than in its own forward. Under
    ATen's AVX512 kernels the two paths round these values differently (the risk); under its AVX2
    kernels (an AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2 here) they agree on them, and the same
    equality holds with nothing at stake."""
    torch.manual_seed(0)
    model, x = _Stack(inner=36).eval(), torch.randn(2, 7, 8) * 3
    inner = torch.randn(2, 7, 36) * 4
    if torch.backends.cpu.get_cpu_capability() == "AVX512":  # what batching would risk
        assert not torch.equal(F.silu(inner.repeat(4, 1, 1))[6:], F.silu(inner))
    ops = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    fq = FakeQuantModel(model, ops, reduce_range=False, arithmetic=arithmetic)
    captured = {}
    model.head.register_forward_hook(lambda _m, _a, out: captured.__setitem__("out", out))

    def forward() -> torch.Tensor:
        model(x)
        return captured["out"]

    def single(name: str, on: bool) -> float:
        fq.set(name, on)
        value = float((forward() - ref).pow(2).sum())
        fq.set(name, not on)
        return value

    names = ops[2:]  # layers 1 and 2, and the head
    with torch.no_grad():
        fq.calibrate([{"x": x}])
        fq.set_all(False)
        ref = forward()
        for base in (False, True):  # each op int8 alone (float elsewhere: SiLU's bits reach the logits)
            fq.set_all(base)
            got = run_trials(model, fq, forward, ref, [{n: not base} for n in names], "head")
            assert got == [single(n, not base) for n in names]
    assert "forward" not in vars(model.layers[1].act)  # the per-trial wrapper is gone


def test_plan_batches_the_last_layers_and_the_head():
    layers = [f"m.layers.{i}" for i in range(11)]
    names = [
        "m.embed",
        "m.layers.1.q",
        "m.layers.9.q",
        "m.layers.10.q",
        "m.layers.10.k",
        "v.blocks.0.fc",
        "head",
    ]
    chunks, rest = plan(layers, names, "head", last_layers=2, max_trials=2)
    assert chunks == [["m.layers.9.q", "m.layers.10.q"], ["m.layers.10.k", "head"]]
    assert rest == ["m.embed", "m.layers.1.q", "v.blocks.0.fc"]
