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

from ..phases import FALLBACK, REQUANT
from ..schemes import inc as inc_scheme
from .contract import Capture, HelperCall, PassResult, PassSpec
from .distributed import ONE_PROCESS, Shard, run_sharded
from .fakequant import FakeQuantModel
from .memory import current_rss_gib, peak_memory, reset_peak_rss
from .numerics import Numerics, resolve_numerics
from .reuse import SuffixCache, vision_cache
from .trial_log import TRIAL_LOG, TrialLog, pass_fingerprint

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
    ``on_call`` runs after each phase x batch (once at the end with several processes).
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
    op_types = dict(spec.ops)
    scored = [name for name, _ in spec.scored]
    resumable = workspace is not None and spec.model_sha256 is not None
    log_name = TRIAL_LOG if shard.world == 1 else f"native_trials.{shard.rank}of{shard.world}.jsonl"
    trials = TrialLog(workspace / log_name if resumable else None, pass_fingerprint(spec, num))
    rss_reset = reset_peak_rss()
    rss_at_start = current_rss_gib()
    kept = [e.op_name for e in spec.excluded]
    model = num.prepare(model, {*scored, *kept})
    last = spec.module_order[-1]
    fq = FakeQuantModel(model, scored, num.reduce_range, num.arithmetic, num.dtype, kept, num.scheme)
    captured: dict[str, torch.Tensor] = {}
    last_module = dict(model.named_modules())[last]
    grab = last_module.register_forward_hook(lambda _m, _a, out: captured.__setitem__("out", out.detach()))
    capture, seconds, all_int8 = Capture(), {FALLBACK: 0.0, REQUANT: 0.0}, []
    batch_key = [0]
    suffix = SuffixCache(model, fq, batch_key) if n.suffix_reuse else None

    def keep_outputs(on: bool) -> None:
        """Store the block outputs of the forwards to come (the base states and the cumulative curve)."""
        if suffix is not None:
            suffix.record = on

    def error(batch, ref) -> float:
        model(**batch)
        return float((captured["out"].float() - ref).pow(2).sum())

    trial_seconds: dict[str, dict[str, float]] = {FALLBACK: {}, REQUANT: {}, "all_int8": {}}
    calibration_seconds: list[float] = []

    def trial(key: tuple, batch: dict, ref: torch.Tensor) -> float:
        value = trials.get(key)
        if value is None:
            start = time.perf_counter()
            value = error(batch, ref)
            phase, _, name = key
            times = trial_seconds[phase]
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            trials.put(key, value)
        return value

    def record(phase: str, b: int, values: list, start: float) -> None:
        values = shard.gather(values, scored)
        elapsed = time.perf_counter() - start
        seconds[phase] += elapsed
        if values is None:  # not rank 0
            return
        capture.calls.append(_call(phase, b, values, elapsed))
        if on_call is not None:
            on_call(capture)

    try:
        with torch.no_grad(), vision_cache(model, fq, batch_key):
            for b, raw in enumerate(spec.batches):
                batch = num.batch(raw)
                batch_key[0] = b
                keys = [("all_int8", b, "")] + [(p, b, name) for p in (FALLBACK, REQUANT) for name in scored]
                start = time.perf_counter()  # calibration counts: INC pays it in every trial
                ref = None
                keep_outputs(True)
                if not all(k in trials.values for k in keys):  # a batch measured whole needs no forward
                    if suffix is not None:
                        suffix.clear()
                    with (
                        suffix.learn()
                        if suffix is not None and not suffix.prefix
                        else contextlib.nullcontext()
                    ):
                        fq.calibrate([batch])
                    fq.set_all(False)
                    model(**batch)  # the fp32 reference, stored as the requant base
                    ref = captured["out"].float()
                    calibration_seconds.append(time.perf_counter() - start)
                fq.set_all(True)
                logged = ("all_int8", b, "") in trials.values
                all_int8.append(trial(("all_int8", b, ""), batch, ref))  # its forward: the fallback base
                if (
                    suffix is not None
                    and logged
                    and any((FALLBACK, b, o) not in trials.values for o in scored)
                ):
                    model(**batch)  # the all-int8 trial came from the log: store the base anyway
                keep_outputs(False)
                values = []
                for name in tqdm(shard.dealt(scored), desc=f"native fallback batch {b}", leave=False):
                    fq.set(name, False)
                    values.append(((name, op_types[name]), trial((FALLBACK, b, name), batch, ref)))
                    fq.set(name, True)
                record(FALLBACK, b, values, start)
                start = time.perf_counter()
                fq.set_all(False)
                cumulative = n.requant_mode == "cumulative"
                keep_outputs(cumulative)
                if cumulative:
                    first, mine = shard.segment(scored)
                    for name in scored[:first]:  # where INC's curve is when this segment starts
                        fq.set(name, True)
                else:
                    mine = shard.dealt(scored)
                values = []
                for name in tqdm(mine, desc=f"native requant ({n.requant_mode}) batch {b}", leave=False):
                    fq.set(name, True)
                    values.append(((name, op_types[name]), trial((REQUANT, b, name), batch, ref)))
                    if not cumulative:
                        fq.set(name, False)
                record(REQUANT, b, values, start)
                log.info(
                    "native batch %d: %d ops x 2 phases in %.2fs",
                    b,
                    len(scored),
                    sum(c.seconds for c in capture.calls[-2:]),
                )
    finally:
        grab.remove()
        if suffix is not None:
            suffix.remove()
        fq.remove()
        trials.close()
    runtime = {
        "seconds": seconds,
        "seconds_per_op": sum(seconds.values()) / (2 * spec.confidence_batches * len(scored)),
        "trials_resumed": trials.resumed,
        "blocks_reused": suffix.hits if suffix is not None else 0,
        "blocks_run": suffix.runs if suffix is not None else None,
        # measured trials only (resumed ones cost nothing), summed over batches; the
        # calibration forward and the fp32 reference of each batch that needed them
        "trial_seconds": trial_seconds,
        "calibration_seconds": calibration_seconds,
        "rss_at_start_gib": rss_at_start,
        **peak_memory(num.device, rss_reset),
    }
    ranks = shard.gather_runtime(runtime)
    if ranks is None:
        return None
    types_used = sorted({op_types[name] for name in scored})
    conv = (
        "Conv3d quantized (fake-quant; no forward patch needed)"
        if "Conv3d" in types_used
        else "no Conv3d scored"
    )
    return PassResult(
        capture,
        list(spec.ops),
        list(spec.excluded),
        last,
        conv,
        _quantization(num, types_used),
        engine="native",
        requant_mode=n.requant_mode,
        all_int8_mse=sum(all_int8) / len(all_int8),
        details=num.details(),
        runtime=merge_runtimes(ranks),
        scheme=num.scheme,
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
    for key in ("trials_resumed", "blocks_reused", "blocks_run"):
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
