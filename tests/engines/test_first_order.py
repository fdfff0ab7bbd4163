"""First-order screening: the gradient estimate, exact where it decides, and the audit's account."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from op_sensitivity.engines.artifact import build_report
from op_sensitivity.engines.fakequant import FakeQuantModel
from op_sensitivity.engines.first_order import curve_points, estimate_batch, peer_scores
from op_sensitivity.engines.native import run_pass
from op_sensitivity.engines.runner import load_inputs
from op_sensitivity.engines.screening import CHECK_SAMPLE, audit_record, check_sample, refine
from op_sensitivity.fallback.policy import choose
from op_sensitivity.inventory import read_inventory
from op_sensitivity.phases import BOTH, FALLBACK, PHASES, REQUANT
from op_sensitivity.report.rank import screening_lines
from op_sensitivity.report.scores import phase_scores, select_phase
from tests.handmade import fallback_params
from tests.helpers import sensitivity_params
from tests.validation.massive import INPUT, MASSIVE, RESIDUAL, massive_copy
from tests.validation.planted import PLANTED, native_reports, screened_reports


class _Parallel(nn.Module):
    """Two Linear ops read the same input and their outputs add into the logits: the logits are
    linear in the ops' outputs and no op's quantization changes another's input, so every value
    has a closed form in the ops' int8 errors ``d_a``, ``d_b``."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(16, 12), nn.Linear(16, 12)
        with torch.no_grad():
            for m in (self.a, self.b):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.zero_()

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.fixture
def parallel():
    model = _Parallel()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    fq = FakeQuantModel(model, ["a", "b"], reduce_range=False, arithmetic="fake_quant")
    fq.calibrate([{"x": x}])
    with torch.no_grad():
        fq.set_all(False)
        ref = model(x)
        deltas = {}
        for name in ("a", "b"):
            op = fq.ops[name]
            deltas[name] = (fq._compute(op, x, True) - fq._compute(op, x, False)).double()
    return model, fq, x, ref, deltas


def test_the_estimate_has_the_closed_form_of_a_model_linear_in_its_ops(parallel):
    model, fq, x, ref, d = parallel
    da, db = d["a"], d["b"]
    total = float((da + db).pow(2).sum())
    dot = float((da * db).sum())
    est = estimate_batch(fq, lambda: model(x), ref, ["a", "b"], points=1, probes=2000, seed=0)
    assert est.points == [2] and est.curve[0] == pytest.approx(total, rel=1e-5)
    # first order at the all-int8 state: g = 2 (d_a + d_b), so g . d_a = 2 (|d_a|^2 + d_a . d_b)
    assert est.first_order[0] == pytest.approx(2 * (float(da.pow(2).sum()) + dot), rel=1e-4)
    # fallback = L - g . d + |J d|^2: exact but for the Hutchinson estimate of |d|^2 (2000 probes:
    # relative standard error sqrt(2/2000) = 3 %)
    for i, (mine, other) in enumerate(((da, db), (db, da))):
        assert est.second_order[i] == pytest.approx(float(mine.pow(2).sum()), rel=0.15)
        exact = float(other.pow(2).sum())
        neglected = est.second_order[i] - float(mine.pow(2).sum())
        assert est.fallback[i] == pytest.approx(exact + neglected, rel=1e-4, abs=1e-6 * total)
    # the cumulative curve, one segment from the float state (zero gradient) to all int8: the
    # trapezoid gives op a (d_a + d_b) . d_a, off the exact |d_a|^2 by the cross term d_a . d_b
    # docs/engines.md names; the segment's two increments sum to the measured rise exactly
    assert est.requant[0] == pytest.approx(float(da.pow(2).sum()) + dot, rel=1e-4)
    assert est.requant[1] == est.curve[0] and est.residual[0] == pytest.approx(0.0, abs=1e-4 * total)
    # with a point after each op the curve is measured, not estimated
    est2 = estimate_batch(fq, lambda: model(x), ref, ["a", "b"], points=2, probes=0, seed=0)
    assert est2.points == [1, 2] and est2.requant == pytest.approx([float(da.pow(2).sum()), total], rel=1e-5)
    assert est2.second_order == [0.0, 0.0] and (est2.forwards, est2.backwards) == (2, 2)


def test_the_probes_are_seeded(parallel):
    model, fq, x, ref, _ = parallel
    runs = [
        estimate_batch(fq, lambda: model(x), ref, ["a", "b"], 1, 4, seed=s).second_order for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1] != runs[2]


def test_the_sweep_leaves_no_gradient_on_the_model(parallel):
    model, fq, x, ref, _ = parallel
    before = [p.requires_grad for p in model.parameters()]
    assert True in before  # the biases
    estimate_batch(fq, lambda: model(x), ref, ["a", "b"], 2, 2, seed=0)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == before
    assert fq.probe is None and all(op.enabled for op in fq.ops.values())


def test_curve_points_spread_evenly_and_end_at_all_int8():
    assert curve_points(10, 4) == [2, 5, 8, 10]
    assert curve_points(3, 8) == [1, 2, 3]
    assert curve_points(417, 1) == [417]


def test_peer_scores_follow_their_formulas(parallel):
    """ModelOpt: sum((g * dY)^2) at the float model; AutoRound: sum|g_qx * (x - Qx)| + sum|g_qW * (W - QW)|
    at the all-int8 model, both with the task loss (here: next-token cross entropy, logits read as
    one sequence of 4 positions over 12 classes)."""
    model, fq, x, _, d = parallel
    ids = torch.tensor([[3, 7, 1, 5]])
    batch = {"input_ids": ids}
    forward = lambda: model(x).unsqueeze(0)  # noqa: E731
    scores = peer_scores(fq, forward, batch, ["a", "b"])
    ops = [fq.ops[n] for n in ("a", "b")]
    weights = [op.param.detach() for op in ops]  # the stored weights (the modules hold placeholders)
    logits = (x @ weights[0].T + x @ weights[1].T).requires_grad_()  # the float model (zero biases)
    loss = nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    (g,) = torch.autograd.grad(loss, [logits])  # the same g reaches each op's output
    for i, name in enumerate(("a", "b")):
        assert scores["modelopt"][i] == pytest.approx(float((g.double() * d[name]).pow(2).sum()), rel=1e-4)
    # AutoRound, by hand: the all-int8 logits' gradient, taken back to each op's quantized input
    # (g @ QW) and weight (g^T Qx), against the quantization errors x - Qx and W - QW
    with torch.no_grad():
        fq.set_all(True)
        logits8 = model(x).requires_grad_()
    (g8,) = torch.autograd.grad(nn.functional.cross_entropy(logits8[:-1], ids[0, 1:]), [logits8])
    for i, op in enumerate(ops):
        scale, zero, lo, hi = op.in_qp
        qx = torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)
        qw = (op.q_weight * op.q_scale).float()
        expected = (g8 @ qw * (x - qx)).abs().sum() + (g8.T @ qx * (weights[i] - qw)).abs().sum()
        assert scores["autoround"][i] == pytest.approx(float(expected), rel=1e-4)


def _refine_with_a_blind_op(seed: str, audit: int, blind: int, n: int = 40, top: int = 3):
    """Synthetic estimates: every op's estimate is its value times 1.05, but the blind op's is near
    zero while its exact value stands first. Returns whether it reached the top, and the record."""
    exact_vals = [float(i + 1) for i in range(n)]
    exact_vals[blind] = 10.0 * n
    # requant (isolated): estimated right, the blind op least sensitive there, so only its
    # fallback value can bring it into a top
    requant = [float(i + 1) for i in range(n)]
    requant[blind] = 0.5
    est = {FALLBACK: [[-v * 1.05 + 1000.0 for v in exact_vals]], REQUANT: [requant]}
    truth = {FALLBACK: [[-v + 1000.0 for v in exact_vals]], REQUANT: [list(requant)]}
    est[FALLBACK][0][blind] = 999.0  # blind: the estimate says reverting it gives nothing back
    values = {p: [list(r) for r in est[p]] for p in PHASES}
    exact = {p: [[False] * n] for p in PHASES}

    def measure(todo):
        for p, idx in todo.items():
            for i in idx:
                values[p][0][i] = truth[p][0][i]
                exact[p][0][i] = True

    done = refine(values, exact, [0.0], False, top, 1.0, measure, sample=0, audit=audit, seed=seed)
    record = audit_record(done, values, False, top, [f"op{i}" for i in range(n)])
    scores = [-v for v in values[FALLBACK][0]]
    best = max(range(n), key=lambda i: (scores[i], -i))
    return best == blind, record


def test_a_blind_op_is_caught_only_if_audited_and_the_stated_escape_chance_holds():
    """An op whose estimate misses its damage entirely: the estimate's interval, sized by the
    audit's largest error, cannot reach it. It is caught when the audit draws it (its exact value
    is then first), so it escapes with the chance the record states: 1 - audited outside
    contention / ops outside contention; 400 seeded repetitions agree within their sampling error."""
    n, audit = 40, 8
    escaped, stated = 0, []
    for s in range(400):
        caught, record = _refine_with_a_blind_op(f"rep{s}", audit, blind=17, n=n)
        escaped += not caught
        stated.append(record[FALLBACK]["escape"])
    chance = sum(stated) / len(stated)
    assert 0.6 < chance < 0.9  # about 1 - 8/40 less what contention takes
    se = (chance * (1 - chance) / 400) ** 0.5
    assert abs(escaped / 400 - chance) < 4 * se


@pytest.mark.parametrize("audit", [2, 3, 20])
def test_the_check_draws_as_many_ops_as_the_audit_at_most_8(audit):
    """The pass sizes the check by the audit (screening.check_sample): after the audit's draw, every
    check draw is min(audit, 8) ops of those not measured."""
    n = 60
    truth = [float(i % 7 + 1) for i in range(n)]  # a flat spectrum: the bound keeps most in contention
    values = {FALLBACK: [[-1.1 * v for v in truth]], REQUANT: [[1.1 * v for v in truth]]}
    exact = {p: [[False] * n] for p in PHASES}

    def measure(todo):
        for p, idx in todo.items():
            for i in idx:
                values[p][0][i] = -truth[i] if p == FALLBACK else truth[i]
                exact[p][0][i] = True

    sample = check_sample(audit)
    done = refine(values, exact, [0.0], False, 1, 1.0, measure, sample=sample, audit=audit, budget=2)
    for p in PHASES:
        draws = done.draws[p]
        assert draws[0] == (audit, n)  # the audit, of all ops
        assert len(draws) > 1 and all(d == min(audit, CHECK_SAMPLE) for d, _ in draws[1:])
    assert check_sample(0) == CHECK_SAMPLE  # bfloat16 / tf32 screening: no audit, the fixed check


def test_an_audited_blind_op_widens_the_bound_and_enters_the_top():
    for s in range(200):
        caught, record = _refine_with_a_blind_op(f"rep{s}", 8, blind=17)
        if "op17" in record[FALLBACK]["ops"]:
            assert caught
            return
    pytest.fail("no seed drew the blind op")


@pytest.fixture(scope="module")
def planted_runs(small_model_dir, calibration_dir, tmp_path_factory):
    """The planted model (an outlier pair in layer 0's MLP), native exact and first_order."""
    work = tmp_path_factory.mktemp("first_order")
    native = {"screening": None, "exact_top": 3, "audit": 4}
    runs = {"exact": {**native, "screening": "none"}, "first_order": {**native, "screening": "first_order"}}
    reports, inventory = screened_reports(small_model_dir, calibration_dir, work, runs)
    return reports, inventory


def test_first_order_is_exact_where_the_ranking_is_decided(planted_runs):
    """On the planted model the fallback phase is nearly flat (reverting one op of the pair leaves
    the other's damage), so the estimate's errors are large against its spread: a check sample
    shows an error past the audit's bound, the bound widens and the pass measures what it must.
    Every measured value is the exact pass's, and every top the policies read is."""
    reports, inventory = planted_runs
    exact, screened = reports["exact"], reports["first_order"]
    meta = screened["metadata"]["screening"]
    assert meta["precision"] == "first_order" and meta["exact_top"] == 3
    assert screened["metadata"]["all_int8_mse"] == exact["metadata"]["all_int8_mse"]
    assert meta["widened"] and meta["margin_used"] > meta["margin"]
    assert meta["check"]["trials"] == 2 * sum(map(len, meta["check"]["ops"].values())) > 0
    for phase in PHASES:
        rows = {o["op_name"]: o for o in exact["phases"][phase]["ops"]}
        audit = meta["audit"][phase]
        assert len(audit["ops"]) == 4 and set(audit["ops"]) <= set(audit["measured"])
        assert 0.0 <= audit["recall"] <= 1.0 and 0.0 <= audit["escape"] < 1.0
        measured = {*meta["refined"][phase], *meta["check"]["ops"][phase], *audit["measured"]}
        for op in screened["phases"][phase]["ops"]:
            assert op["precision"] == ("exact" if op["op_name"] in measured else "estimated")
            if op["op_name"] in measured:  # every measured value is the exact pass's, to the bit
                assert op["mse_per_batch"] == rows[op["op_name"]]["mse_per_batch"]
    per_batch = meta["estimate"]["per_batch"]
    assert len(per_batch) == 2 and all(b["forwards"] == len(b["points"]) for b in per_batch)
    scores = {k: phase_scores(r, inventory) for k, r in reports.items()}
    for phase in (*PHASES, BOTH):
        tops = [list(select_phase(scores[k], phase)["module"][:3]) for k in ("exact", "first_order")]
        assert tops[0] == tops[1], phase
    # the planted outlier: where the cumulative curve jumps, first by the estimate alone and exactly
    up = next(m for m in sorted(PLANTED) if "up_proj" in m)
    assert meta["audit"][REQUANT]["top_estimated"][0] == meta["audit"][REQUANT]["top"][0] == up


@pytest.mark.parametrize("phase", ["fallback", "requant", "both"])
def test_first_order_ships_the_exact_passs_keep_list(planted_runs, phase):
    reports, inventory = planted_runs
    for raw in ({"policy": "top_k", "top_k": {"k": 3}}, {"policy": "error_budget"}):
        p = fallback_params(phase=phase, fused_groups=False, always_keep=[], **raw)
        lists = [
            list(choose(select_phase(phase_scores(reports[k], inventory), phase), p)["op_name"])
            for k in ("exact", "first_order")
        ]
        assert lists[0] == lists[1] and lists[0], (phase, raw)


def test_a_planted_massive_activation_op_is_in_the_top_3_by_estimate_and_exactly(
    default_model_dir, calibration_dir, tmp_path
):
    """Residual channels ~1000x the rest after layer 0, passed by layer 1's norms into its five
    input linears at ~300x the rest (tests/validation/massive.py): under per-tensor int8 the rest
    of those inputs rounds to a few codes. In both phases a planted op stands in the top 3 of the
    estimate alone (before any exact trial) and of the exact pass."""
    inventory = default_model_dir.parent / "op_inventory.json"
    model_dir, facts = massive_copy(default_model_dir, inventory, tmp_path / "m" / "qwen", calibration_dir)
    assert facts["residual_ratio"] == pytest.approx(RESIDUAL, rel=0.05)
    assert facts["input_ratio"] == pytest.approx(INPUT, rel=0.01)
    assert facts["argmax_kept"] > 0.8  # the float model stays near the original
    native = {"exact_top": 3, "audit": 4}
    runs = {"exact": {**native, "screening": "none"}, "first_order": {**native, "screening": "first_order"}}
    reports, inventory = native_reports(model_dir, calibration_dir, tmp_path, runs)
    audit = reports["first_order"]["metadata"]["screening"]["audit"]
    scores = phase_scores(reports["exact"], inventory)
    for phase in PHASES:
        assert MASSIVE & set(audit[phase]["top_estimated"][:3]), phase
        assert MASSIVE & set(select_phase(scores, phase)["module"][:3]), phase


def test_an_exact_budget_caps_the_pass_and_names_what_it_left(small_model_dir, calibration_dir, tmp_path):
    """On the planted model the unbudgeted pass measures every op (its check widens the bound);
    with exact_budget 3 each phase measures at most 3 for the selection, and the report names
    the ops still in contention."""
    native = {"screening": "first_order", "exact_top": 3, "audit": 4, "exact_budget": 3}
    reports, _ = screened_reports(small_model_dir, calibration_dir, tmp_path, {"capped": native})
    meta = reports["capped"]["metadata"]["screening"]
    assert meta["budget"]["exact_budget"] == 3
    unsettled = meta["budget"]["unsettled"]
    assert unsettled, "the planted model's flat fallback needs more than 3 exact ops"
    for phase in PHASES:
        assert len(meta["refined"][phase]) <= 3
        assert not set(unsettled.get(phase, [])) & set(meta["refined"][phase])
    assert any("Top not settled" in line for line in screening_lines(meta))


def test_a_first_order_pass_resumes_to_the_same_bytes(small_model_dir, calibration_dir, tmp_path):
    inventory_path = small_model_dir.parent / "op_inventory.json"
    inventory = read_inventory(inventory_path)
    native = replace(sensitivity_params().native, screening="first_order", exact_top=2, audit=3)
    params = sensitivity_params(native=native, confidence_batches=2, engine="native")
    docs, results = [], []
    for _ in range(2):
        model, spec, _, meta = load_inputs(params, calibration_dir, small_model_dir, inventory_path)
        spec = replace(spec, model_sha256=meta["model"]["sha256"])
        results.append(run_pass(model, spec, workspace=tmp_path))
        docs.append(json.dumps(build_report(results[-1], inventory, meta), sort_keys=True))
    assert docs[0] == docs[1]
    assert results[0].runtime["trials_resumed"] == 0 and results[1].runtime["trials_resumed"] > 0


def test_seeds_vary_the_synthetic_audit():
    draws = {tuple(sorted(_refine_with_a_blind_op(f"s{i}", 8, 17)[1][FALLBACK]["ops"])) for i in range(5)}
    assert len(draws) > 1


def test_the_report_says_what_was_estimated_and_what_the_audit_found(planted_runs):
    reports, _ = planted_runs
    meta = reports["first_order"]["metadata"]["screening"]
    lines = screening_lines(meta)
    per_batch = meta["estimate"]["per_batch"]
    forwards = sum(b["forwards"] for b in per_batch)
    assert f"from {forwards} forward and" in lines[0] and "over 2 confidence batches" in lines[0]
    assert f"widened {len(meta['widened'])} times" in lines[0]
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in lines
        if line.startswith("| f") or "| requant" in line
    }
    for phase in PHASES:
        audit = meta["audit"][phase]
        cells = [c.strip() for c in rows[phase].strip("|").split("|")]
        assert cells[2] == str(len(audit["ops"])) and cells[4] == f"{audit['recall']:.2f}"
        assert cells[6] == f"{audit['escape']:.2f}"


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 12)

    def forward(self, x):
        return self.b(self.a(x))


def test_the_sweep_keeps_no_upcast_copy_of_a_stored_weight():
    """A bf16 checkpoint computed in float32: autograd would keep each Linear's float32 weight for
    the backward (about 14 GiB for the 3B); the sweep keeps the stored bf16 one instead, and the
    gradient is the float32 op's."""
    model = _Chain()
    for m in (model.a, model.b):  # the weights as a bf16 checkpoint stores them (the engine upcasts the rest)
        m.weight.data = m.weight.data.to(torch.bfloat16)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    fq = FakeQuantModel(model, ["a", "b"], reduce_range=False, arithmetic="fake_quant")
    fq.calibrate([{"x": x}])
    with torch.no_grad():
        fq.set_all(False)
        ref = model(x).float()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        est = estimate_batch(fq, lambda: model(x).float(), ref, ["a", "b"], points=2, probes=1, seed=0)
    weight_b = tuple(fq.ops["b"].param.shape)
    assert (torch.bfloat16, weight_b) in saved  # the stored weight, kept by reference
    assert (torch.float32, weight_b) not in saved  # no float32 copy of it
    # the same gradient as the plain float32 op: c_1 (op a alone) from the sweep's own forward
    assert est.curve[0] > 0 and est.first_order[1] != 0


def test_the_sweep_keeps_no_upcast_copy_of_an_op_kept_in_full_precision():
    """An op the params keep fp32 is computed like a scored op in float: a pass that keeps most
    ops (a first 3B run) held each one's float32 copy through the backward, 22.7 GiB at 3B."""
    model = _Chain()
    for m in (model.a, model.b):
        m.weight.data = m.weight.data.to(torch.bfloat16)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    fq = FakeQuantModel(model, ["a"], reduce_range=False, arithmetic="fake_quant", kept=["b"])
    fq.calibrate([{"x": x}])
    with torch.no_grad():
        fq.set_all(False)
        ref = model(x).float()
        plain = F.linear(model.a(x), fq.kept["b"].param.float(), model.b.bias)
    assert torch.equal(ref, plain)  # the kept op's forward is the float32 op's, bit for bit
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        est = estimate_batch(fq, lambda: model(x).float(), ref, ["a"], points=1, probes=1, seed=0)
    weight_b = tuple(fq.kept["b"].param.shape)
    assert (torch.bfloat16, weight_b) in saved and (torch.float32, weight_b) not in saved
    assert est.curve[0] > 0 and est.first_order[0] != 0
