"""Native sensitivity engine: INC's mse_v2 measurements in plain PyTorch, on CPU or GPU.

Why: INC deep-copies the model and re-runs ``prepare_fx``/``convert_fx`` for every op (~1 s/op on
the tiny model, ~45 s/op at 3B width on CPU, no GPU). Here observers are calibrated once per
confidence batch and each trial only toggles fake-quantization on modules: no copy, no tracing.

This module is the pass loop. What it computes with lives beside it: the fake-quantized model
and INC's numerics (:mod:`.fakequant`), the resolved settings (:mod:`.numerics`), the resumable
trial log (:mod:`.trial_log`), the memory probes (:mod:`.memory`), the reuse caches
(:mod:`.reuse`) and the sharding over processes (:mod:`.distributed`).

Measurement: sum of squared differences at the output of the last op (lm_head) vs fp32.
``fallback``: all scored ops quantized but one. ``requant`` ``cumulative``: INC's curve (ops
quantized one after another in module order, never reverted). ``isolated`` (INC lacks it):
only this op quantized, a true per-op measure.

Reuse: the vision tower's output is cached while only text ops change, and with
``suffix_reuse`` each decoder layer's and vision block's output while no op before it changed,
so a trial recomputes from the toggled op's block onward; values are those of a full recompute.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import logs
from ..phases import FALLBACK, REQUANT
from ..schemes import inc_cpu as inc_scheme
from .contract import Capture, HelperCall, PassResult, PassSpec
from .distributed import ONE_PROCESS, Shard, run_sharded
from .fakequant import FakeQuantModel
from .first_order import estimate_batch
from .memory import current_rss_gib, peak_memory, reset_peak_rss
from .numerics import Numerics, resolve_numerics
from .reuse import SuffixCache, vision_cache
from .screening import ScreeningRecord, audit_record, check_sample, fast_precision, refine
from .trial_batch import batchable, decoder_layers, fallback_states, plan, run_trials
from .trial_log import TRIAL_LOG, TrialLog, pass_fingerprint
from .vision_attention import batched_window_attention

log = logging.getLogger(__name__)


def run_pass(
    model: nn.Module,
    spec: PassSpec,
    *,
    workspace: Path | None = None,
    on_call: Callable[[Capture], None] | None = None,
    shard: Shard = ONE_PROCESS,
) -> PassResult | None:
    """Both phases over the spec's confidence batches; same op set and order as the INC engine.

    Every trial's value goes to the workspace's :class:`TrialLog` as it is measured (when the
    spec names its model); a rerun of the same pass after a kill measures only what is missing.
    ``on_call`` runs after each phase x batch (once at the end with several processes, or with
    screening, where values are final only after the refinement).
    With ``native.processes`` > 1 the pass runs sharded (:mod:`.distributed`); a worker process
    runs its ``shard`` and gets None back except on rank 0.
    """
    num = resolve_numerics(spec.params)
    n = spec.params.native
    if n.processes > 1 and shard.world == 1:
        with contextlib.ExitStack() as scratch:
            if workspace is None:  # the workers' trial logs, for this call only
                workspace = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="op_sensitivity_")))
            result = run_sharded(run_pass, model, spec, workspace, num.device)
        if on_call is not None:
            on_call(result.capture)
        return result
    loop = _PassLoop(model, spec, num, workspace, on_call, shard)
    try:
        loop.run()
    finally:
        loop.close()
    return loop.result()


class _PassLoop:
    """One pass over the confidence batches: calibration, the all-int8 trial, the two phases, and
    with screening the float32 refinement (:mod:`.screening`)."""

    def __init__(self, model, spec: PassSpec, num: Numerics, workspace, on_call, shard: Shard):
        self.spec, self.num, self.n, self.shard, self.on_call = spec, num, spec.params.native, shard, on_call
        self.op_types = dict(spec.ops)
        self.scored = [name for name, _ in spec.scored]
        self.cumulative = self.n.requant_mode == "cumulative"
        self.fast = self.n.screening if self.n.screening != "none" else None
        self.estimating = self.fast == "first_order"  # values estimated from gradients (:mod:`.first_order`)
        resumable = workspace is not None and spec.model_sha256 is not None
        log_name = TRIAL_LOG if shard.world == 1 else f"native_trials.{shard.rank}of{shard.world}.jsonl"
        self.trials = TrialLog(workspace / log_name if resumable else None, pass_fingerprint(spec, num))
        self.rss_reset = reset_peak_rss()
        self.rss_at_start = current_rss_gib()
        kept = [e.op_name for e in spec.excluded]
        self.model = num.prepare(model, {*self.scored, *kept})
        self.fq = FakeQuantModel(
            self.model, self.scored, num.reduce_range, num.arithmetic, num.dtype, kept, num.scheme
        )
        self.captured: dict[str, torch.Tensor] = {}
        last_module = dict(self.model.named_modules())[spec.module_order[-1]]
        # a gradient sweep needs the logits' graph; every other forward only their values
        self.grab = last_module.register_forward_hook(
            lambda _m, _a, out: self.captured.__setitem__("out", out if self.fq.probe else out.detach())
        )
        self.capture, self.all_int8 = Capture(), []
        self.seconds = {FALLBACK: 0.0, REQUANT: 0.0}
        self.batch_key: list = [(0, "float32")]  # the caches' key: (batch, precision)
        self.suffix = SuffixCache(self.model, self.fq, self.batch_key) if self.n.suffix_reuse else None
        self.layers = decoder_layers(self.model)
        self.batched = 0  # trials measured several per forward
        self.trial_seconds: dict[str, dict[str, float]] = {FALLBACK: {}, REQUANT: {}, "all_int8": {}}
        self.calibration_seconds: list[float] = []
        self.vision = contextlib.ExitStack()
        self.vision.enter_context(vision_cache(self.model, self.fq, self.batch_key))
        self.vision.enter_context(batched_window_attention(self.model))  # one call per window length
        # screening: per phase and batch, the values in scored order and whether each is float32's
        self.values: dict[str, list[list[float]]] = {FALLBACK: [], REQUANT: []}
        self.exact: dict[str, list[list[bool]]] = {FALLBACK: [], REQUANT: []}
        self.frozen: list[dict | None] = []
        self.noise: list[dict[str, float]] = []
        self.estimates: list[dict[str, Any]] = []  # first_order: per batch, what the estimate measured
        self.screening: ScreeningRecord | None = None

    # -- forwards and trials ------------------------------------------------------------------

    def keep_outputs(self, on: bool) -> None:
        """Store the block outputs of the forwards to come (the base states and the cumulative curve)."""
        if self.suffix is not None:
            self.suffix.record = on

    def forward(self, batch: dict) -> torch.Tensor:
        self.model(**batch)
        return self.captured["out"].float()

    def trial(self, key: tuple, batch: dict, ref: torch.Tensor) -> float:
        value = self.trials.get(key)
        if value is None:
            start = time.perf_counter()
            value = float((self.forward(batch) - ref).pow(2).sum())
            phase, _, name = key
            times = self.trial_seconds.setdefault(phase, {})
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            self.trials.put(key, value)
        return value

    def logged(self, keys: list[tuple]) -> bool:
        return all(k in self.trials.values for k in keys)

    def calibrate(self, b: int, batch: dict) -> torch.Tensor:
        """Observers on the batch; the same forward is its float32 reference (every op computes as
        the fp32 model while observing) and stores the requant base: one forward per batch. (Under
        ``ort_qdq`` an observed Linear computes MatMul + Add as the ONNX graph does, which may differ
        from the fp32 Linear in the last bit: the reference is then a forward of its own.)"""
        start = time.perf_counter()
        self.batch_key[0] = (b, "float32")
        self.keep_outputs(True)
        if self.suffix is not None:
            self.suffix.clear()
        learn = self.suffix is not None and not self.suffix.prefix
        with self.suffix.learn() if learn else contextlib.nullcontext():
            self.fq.calibrate([batch])
        if self.num.scheme.bias == "onnx_export":  # its observers see MatMul + Add, not the fp32 Linear
            if self.suffix is not None:
                self.suffix.clear()  # the blocks' outputs then come from the reference forward
            self.fq.set_all(False)
            self.forward(batch)
        ref = self.captured["out"].float()
        self.calibration_seconds.append(time.perf_counter() - start)
        return ref

    def phase_key(self, phase: str, b: int, name: str, precision: str | None) -> tuple:
        return (phase if precision is None else f"{phase}@{precision}", b, name)

    def fallback(self, b: int, batch: dict, ref, names: list[str], precision: str | None) -> list[float]:
        """Every op int8 but one (the all-int8 state is set and its outputs stored by the caller).
        Trials near the head go several per forward (:mod:`.trial_batch`) into the log first."""
        self.keep_outputs(False)
        self.batched_fallback(b, batch, ref, names, precision)
        out = []
        for name in tqdm(names, desc=f"native fallback batch {b}", leave=False, file=logs.terminal_err()):
            self.fq.set(name, False)
            out.append(self.trial(self.phase_key(FALLBACK, b, name, precision), batch, ref))
            self.fq.set(name, True)
        return out

    def batched_fallback(self, b: int, batch: dict, ref, names: list[str], precision: str | None) -> None:
        """The trials of ``names`` near the head, several per forward, into the trial log."""
        n = self.n
        todo = [o for o in names if self.phase_key(FALLBACK, b, o, precision) not in self.trials.values]
        # under bf16 autocast torch's int8 kernels return float32 where the float path gives bf16:
        # rows of one tensor cannot hold both, so those trials run one per forward
        mixed = precision == "bfloat16" and self.num.arithmetic == "int8_kernels"
        if ref is None or n.trial_batch < 2 or not todo or mixed or not batchable(self.fq):
            return
        head = self.spec.module_order[-1]
        runs, _ = plan(self.layers, todo, head, last_layers=n.trial_batch_layers, max_trials=n.trial_batch)
        for run in runs:
            start = time.perf_counter()
            values = run_trials(
                self.model, self.fq, lambda: self.forward(batch), ref, fallback_states(run), head
            )
            times = self.trial_seconds.setdefault(self.phase_key(FALLBACK, b, "", precision)[0], {})
            for name, value in zip(run, values, strict=True):
                self.trials.put(self.phase_key(FALLBACK, b, name, precision), value)
                times[name] = times.get(name, 0.0) + (time.perf_counter() - start) / len(run)
            self.batched += len(run)

    def requant(
        self, b: int, batch: dict, ref, names: list[str], precision: str | None, first: int = 0
    ) -> list[float]:
        """INC's cumulative curve (or each op alone), at the ops ``names`` (in scored order); the
        curve starts with the first ``first`` scored ops int8 (a shard's segment)."""
        self.fq.set_all(False)
        self.keep_outputs(self.cumulative)
        index = {name: i for i, name in enumerate(self.scored)}
        on = first if self.cumulative else 0  # cumulative: the scored ops before this count are int8
        for other in self.scored[:on]:
            self.fq.set(other, True)
        out = []
        desc = f"native requant ({self.n.requant_mode}) batch {b}"
        for name in tqdm(names, desc=desc, leave=False, file=logs.terminal_err()):
            if self.cumulative:
                for other in self.scored[on : index[name] + 1]:
                    self.fq.set(other, True)
                on = index[name] + 1
            else:
                self.fq.set(name, True)
            out.append(self.trial(self.phase_key(REQUANT, b, name, precision), batch, ref))
            if not self.cumulative:
                self.fq.set(name, False)
        return out

    def record(self, phase: str, b: int, values: list[float], names: list[str], elapsed: float) -> None:
        pairs = self.shard.gather(
            [((k, self.op_types[k]), v) for k, v in zip(names, values, strict=True)], self.scored
        )
        self.seconds[phase] += elapsed
        if pairs is None:  # not rank 0
            return
        self.capture.calls.append(_call(phase, b, pairs, elapsed))
        if self.on_call is not None:
            self.on_call(self.capture)

    # -- the pass -----------------------------------------------------------------------------

    def run(self) -> None:
        with torch.no_grad():
            for b, raw in enumerate(self.spec.batches):
                self.batch(b, self.num.batch(raw))
            if self.fast is not None:
                self.refine()

    def batch(self, b: int, batch: dict) -> None:
        scored, shard = self.scored, self.shard
        screen = self.fast
        keys = [("all_int8", b, "")] + [
            self.phase_key(p, b, name, screen) for p in (FALLBACK, REQUANT) for name in scored
        ]
        if screen is not None and not self.estimating:
            keys += [("noise", b, "fp32"), ("noise", b, "int8")]
        start = time.perf_counter()  # calibration counts: INC pays it in every trial
        ref = None
        self.keep_outputs(True)
        self.batch_key[0] = (b, "float32")
        if not self.logged(keys):  # a batch measured whole needs no forward
            ref = self.calibrate(b, batch)
        self.frozen.append(self.fq.frozen() if ref is not None and screen is not None else None)
        self.fq.set_all(True)
        logged = ("all_int8", b, "") in self.trials.values
        self.all_int8.append(self.trial(("all_int8", b, ""), batch, ref))  # its forward: the fallback base
        if self.estimating:
            self.estimate(b, batch, ref, keys[1:], time.perf_counter() - start)
            return
        if screen is not None:
            self.screen_bases(b, batch, ref, logged)
        elif self.suffix is not None and logged and not self.logged([(FALLBACK, b, o) for o in scored]):
            self.forward(batch)  # the all-int8 trial came from the log: store the base anyway
        with fast_precision(screen, self.num.device) if screen else contextlib.nullcontext():
            mine = shard.dealt(scored)
            values = self.fallback(b, batch, ref, mine, screen)
            self.keep(FALLBACK, b, values, mine, time.perf_counter() - start)
            start = time.perf_counter()
            first, mine = shard.segment(scored) if self.cumulative else (0, shard.dealt(scored))
            values = self.requant(b, batch, ref, mine, screen, first)  # a segment starts where INC's curve is
            self.keep(REQUANT, b, values, mine, time.perf_counter() - start)
        log.info(
            "native batch %d: %d ops x 2 phases in %.2fs%s",
            b,
            len(scored),
            sum(c.seconds for c in self.capture.calls[-2:]) if screen is None else 0.0,
            f" ({screen} screening)" if screen else "",
        )

    def keep(self, phase: str, b: int, values: list[float], names: list[str], elapsed: float) -> None:
        """A phase x batch done: reported now, or with screening kept for the refinement."""
        if self.fast is None:
            self.record(phase, b, values, names, elapsed)
            return
        self.values[phase].append(list(values))
        self.exact[phase].append([False] * len(values))
        self.seconds[phase] += elapsed

    def estimate(self, b: int, batch: dict, ref, keys: list[tuple], elapsed: float) -> None:
        """Both phases of every op estimated from gradients (:mod:`.first_order`), into the trial log
        with what the estimate measured, so a rerun after a kill reads them back."""
        n, scored = self.n, self.scored
        t0 = time.perf_counter()
        extra = [("first_order", b, k) for k in ("forwards", "backwards")]
        if not self.logged(keys + extra):
            est = estimate_batch(
                self.fq,
                lambda: self.forward(batch),
                ref,
                scored,
                n.first_order_points,
                n.first_order_probes,
                b,
            )
            self.trial_seconds.setdefault("first_order", {})[str(b)] = est.seconds
            for phase, values in ((FALLBACK, est.fallback), (REQUANT, est.requant)):
                for name, v in zip(scored, values, strict=True):
                    self.trials.put(self.phase_key(phase, b, name, self.fast), v)
            for m, (k, c, r) in enumerate(zip(est.points, est.curve, est.residual, strict=True)):
                self.trials.put(("first_order", b, f"point:{m}"), float(k))
                self.trials.put(("first_order", b, f"curve:{m}"), c)
                self.trials.put(("first_order", b, f"residual:{m}"), r)
            self.trials.put(extra[0], float(est.forwards))
            self.trials.put(extra[1], float(est.backwards))
        self.fq.set_all(True)
        got = self.trials.values
        points = sorted(
            int(k[2].split(":")[1]) for k in got if k[:2] == ("first_order", b) and "point:" in k[2]
        )
        self.estimates.append(
            {
                "points": [int(got[("first_order", b, f"point:{m}")]) for m in points],
                "curve": [got[("first_order", b, f"curve:{m}")] for m in points],
                "residual": [got[("first_order", b, f"residual:{m}")] for m in points],
                "forwards": int(got[extra[0]]),
                "backwards": int(got[extra[1]]),
            }
        )
        for phase in (FALLBACK, REQUANT):
            values = [got[self.phase_key(phase, b, name, self.fast)] for name in scored]
            self.keep(phase, b, values, scored, (elapsed + time.perf_counter() - t0) / 2)
        log.info("native batch %d: %d ops x 2 phases estimated (first_order)", b, len(scored))

    def screen_bases(self, b: int, batch: dict, ref, int8_logged: bool) -> None:
        """The fast precision's rounding error at the logits, all-fp32 and all-int8 (the bound's
        measure), whose forwards also store the fast phases' base states."""
        keys = [("noise", b, "fp32"), ("noise", b, "int8")]
        todo = [self.phase_key(p, b, o, self.fast) for p in (FALLBACK, REQUANT) for o in self.scored]
        if self.logged(keys) and self.logged(todo):
            self.noise.append({"fp32": self.trials.values[keys[0]], "int8": self.trials.values[keys[1]]})
            return
        start = time.perf_counter()
        self.fq.set_all(True)
        exact_int8 = self.forward(batch) if int8_logged else self.captured["out"].float()
        self.batch_key[0] = (b, self.fast)
        self.keep_outputs(True)
        with fast_precision(self.fast, self.num.device):
            self.fq.set_all(False)
            fp32 = float((self.forward(batch) - ref).norm())
            self.fq.set_all(True)
            int8 = float((self.forward(batch) - exact_int8).norm())
        del exact_int8
        for key, value in zip(keys, (fp32, int8), strict=True):
            if key not in self.trials.values:
                self.trials.put(key, value)
        self.noise.append({"fp32": self.trials.values[keys[0]], "int8": self.trials.values[keys[1]]})
        self.trial_seconds.setdefault("noise", {})[""] = time.perf_counter() - start

    def refine(self) -> None:
        """Float32 values for every op that could stand in the top ``exact_top`` of a ranking a policy
        reads, and for a sample of the others to check the bound (:func:`.screening.refine`)."""
        start = time.perf_counter()

        def measure(todo: dict[str, set[int]]) -> None:
            for b, raw in enumerate(self.spec.batches):
                self.refine_batch(b, self.num.batch(raw), todo)

        if self.estimating:  # the estimate's own error scale: the largest rise its trapezoids missed
            ends = [max(abs(r) for r in e["residual"]) for e in self.estimates]
        else:
            ends = [max(x["fp32"], x["int8"]) for x in self.noise]
        audit = self.n.audit if self.estimating else 0
        done = refine(
            self.values,
            self.exact,
            ends,
            self.cumulative,
            self.n.exact_top,
            self.n.screening_margin,
            measure,
            sample=check_sample(audit),
            audit=audit,
            budget=self.n.exact_budget,
        )
        self.seconds["refine"] = time.perf_counter() - start

        def names(idx: dict[str, set[int]]) -> dict[str, list[str]]:
            """Per phase present (refined and checked hold both, in PHASES order), the op names."""
            return {p: [self.scored[i] for i in sorted(v)] for p, v in idx.items()}

        checked = names(done.checked)
        self.screening = ScreeningRecord(
            self.fast,
            self.n.exact_top,
            self.n.screening_margin,
            done.margin_used,
            self.noise,
            names(done.refined),
            done.observed_ratio,
            {
                "ops": checked,
                "trials": sum(map(len, checked.values())) * len(self.spec.batches),
                "observed_ratio": done.check_ratio,
            },
            done.widened,
        )
        if self.n.exact_budget is not None:
            unsettled = names(done.unsettled)
            self.screening.budget = {"exact_budget": self.n.exact_budget, "unsettled": unsettled}
        if self.estimating:
            self.screening.audit = audit_record(
                done, self.values, self.cumulative, self.n.exact_top, self.scored
            )
            self.screening.estimate = {
                "points": self.n.first_order_points,
                "probes": self.n.first_order_probes,
                "per_batch": self.estimates,
            }
            self.screening.bound = done.ends
        for phase in (FALLBACK, REQUANT):
            for b, row in enumerate(self.values[phase]):
                share = self.seconds[phase] / len(self.values[phase])
                self.record_final(phase, b, row, share)

    def record_final(self, phase: str, b: int, values: list[float], elapsed: float) -> None:
        pairs = [((k, self.op_types[k]), v) for k, v in zip(self.scored, values, strict=True)]
        self.capture.calls.append(_call(phase, b, pairs, elapsed))
        if self.on_call is not None:
            self.on_call(self.capture)

    def refine_batch(self, b: int, batch: dict, todo: dict[str, set[int]]) -> None:
        """The float32 trials ``todo`` of batch ``b``, on its own qparams (restored, not recalibrated)."""
        fb = [self.scored[i] for i in sorted(todo[FALLBACK])]
        rq = [self.scored[i] for i in sorted(todo[REQUANT])]
        keys = [(FALLBACK, b, o) for o in fb] + [(REQUANT, b, o) for o in rq]
        if self.logged(keys):
            ref = None
        elif self.frozen[b] is None:  # sweep one took this batch from the log: calibrate it now
            ref = self.calibrate(b, batch)
        else:
            self.fq.restore(self.frozen[b])
            self.batch_key[0] = (b, "float32")
            if self.suffix is not None:
                self.suffix.clear()
            self.keep_outputs(True)
            self.fq.set_all(False)
            ref = self.forward(batch)
        index = {name: i for i, name in enumerate(self.scored)}
        if fb:
            self.fq.set_all(True)
            self.keep_outputs(True)
            if ref is not None:
                self.forward(batch)  # the all-int8 base
            for name, v in zip(fb, self.fallback(b, batch, ref, fb, None), strict=True):
                self.values[FALLBACK][b][index[name]] = v
                self.exact[FALLBACK][b][index[name]] = True
        if rq:
            for name, v in zip(rq, self.requant(b, batch, ref, rq, None), strict=True):
                self.values[REQUANT][b][index[name]] = v
                self.exact[REQUANT][b][index[name]] = True

    def close(self) -> None:
        self.vision.close()
        self.grab.remove()
        if self.suffix is not None:
            self.suffix.remove()
        self.fq.remove()
        self.trials.close()

    def result(self) -> PassResult | None:
        spec, num, scored = self.spec, self.num, self.scored
        suffix = self.suffix
        runtime = {
            "seconds": self.seconds,
            "seconds_per_op": sum(self.seconds.values()) / (2 * spec.confidence_batches * len(scored)),
            "trials_resumed": self.trials.resumed,
            "blocks_reused": suffix.hits if suffix is not None else 0,
            "blocks_run": suffix.runs if suffix is not None else None,
            "trials_batched": self.batched,
            # measured trials only (resumed ones cost nothing), summed over batches; the
            # calibration forward and the fp32 reference of each batch that needed them
            "trial_seconds": self.trial_seconds,
            "calibration_seconds": self.calibration_seconds,
            "rss_at_start_gib": self.rss_at_start,
            **peak_memory(num.device, self.rss_reset),
        }
        ranks = self.shard.gather_runtime(runtime)
        if ranks is None:
            return None
        types_used = sorted({self.op_types[name] for name in scored})
        conv = (
            "Conv3d quantized (fake-quant; no forward patch needed)"
            if "Conv3d" in types_used
            else "no Conv3d scored"
        )
        return PassResult(
            self.capture,
            list(spec.ops),
            list(spec.excluded),
            spec.module_order[-1],
            conv,
            _quantization(num, types_used),
            engine="native",
            requant_mode=self.n.requant_mode,
            all_int8_mse=sum(self.all_int8) / len(self.all_int8),
            details=num.details(),
            runtime=merge_runtimes(ranks),
            scheme=num.scheme,
            screening=None if self.screening is None else self.screening.doc(),
        )


def _quantization(num: Numerics, types_used: list[str]) -> dict[str, Any]:
    """The report's per-op-type scheme: INC's vocabulary for inc_cpu, the scheme's specs otherwise."""
    if num.scheme.name == "inc_cpu":
        return {
            "reduce_range": num.reduce_range,
            "by_op_type": {t: inc_scheme.by_op_type(t) for t in types_used},
        }
    s = num.scheme
    specs = {"weight": s.weights, "input": s.inputs, "output": s.outputs}
    return {
        "scheme": s.name,
        "by_op_type": {
            t: {k: None if v is None else asdict(v) for k, v in specs.items()} for t in types_used
        },
    }


def merge_runtimes(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One pass's runtime from its processes': rank 0's wall seconds, summed counts, the top peak."""
    merged = dict(ranks[0])
    if len(ranks) == 1:
        return merged
    for key in ("trials_resumed", "blocks_reused", "blocks_run", "trials_batched"):
        merged[key] = None if merged[key] is None else sum(r[key] for r in ranks)
    for key in ("rss_at_start_gib", "peak_rss_gib", "peak_gpu_memory_gib"):
        if key in merged:
            merged[key] = max(r[key] for r in ranks)
    merged["trial_seconds"] = {
        phase: {name: t for r in ranks for name, t in r["trial_seconds"][phase].items()}
        for phase in merged["trial_seconds"]
    }
    merged["processes"] = len(ranks)
    return merged


def _call(phase: str, batch: int, values: list, seconds: float) -> HelperCall:
    return HelperCall(
        phase,
        batch,
        main=values,
        returned=[k for k, _ in sorted(values, key=lambda kv: kv[1])],
        seconds=seconds,
    )
