"""Per stage that will run: what it does (trials, held-out forwards, INC ops), where, and what it costs.

Counts are exact, from the params and the model's ops (``plan.model``: the architecture on the
meta device). Seconds are given only where this machine can tell: a runtime file it wrote for
the same engine, device and model size (``reports/runtime/*.json``), or the forward probe
(``plan.probe``, native trials and held-out forwards). INC's seconds come only from a runtime file:
no probe of a few seconds runs INC's per-op loop. Memory is estimated from the measured
figures documented in docs/benchmarks.md ("What each family member needs", "Whole DAG"):

* native pass (and the curve and validate measurers): the stored weights, plus twice (a fit:
  quantized-module packing, observers, the allocator) the int8 copies (1 byte per scored
  Linear / Conv parameter) and dequantized tables (4 bytes per scored Embedding parameter), plus
  the largest weight of the model in float32, twice (its per-call upcast, whether scored or
  kept: the buffer ``engines.weight_copies`` keeps for it, and a fresh copy where it is held),
  plus 0.5 GiB for the interpreter and libraries; a deployment scheme's pass adds the largest
  scored weight once more in float32 (dequantized from its codes per call). Fit to CPU
  measurements of the full-size 3B: every op scored (17.3 GiB; 19.1 estimated; 16.1-17.5 GiB
  measured on an H100), five ops (9.5 GiB; 10.5 estimated), five ops under ONNX Runtime's
  scheme (11.5 GiB; 11.6 estimated): it errs high, by less than 2 GiB;
* INC (the per-op loop, and its PTQ): 0.6 GiB + 5 x the float32 bytes of the model it runs on:
  measured 10.7 GiB on a 543 M-parameter carved 3B (before the vocabulary cut) and 4.1 GiB on
  the 232 M-parameter one; this rule gives 71 GiB for the whole 3B, where 50-75 GB were seen.

A stage whose estimate exceeds this machine's memory (or its GPU's, on ``cuda``), a CUDA device
that is absent, or a pass that would score more than ``max_ops`` stops the plan: one line naming
the params to change, before DVC removes any output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from tabulate import tabulate

from ..engines.contract import check_scored, exclusions
from ..engines.memory import inc_peak_gib
from ..engines.numerics import resolve_numerics
from ..engines.runner import host_facts, scheme_params
from ..engines.screening import check_sample
from ..errors import InputError
from ..fallback.policy import SCAN_MAX, walk_cost
from ..params import TARGET_SCHEMES, Params, SensitivityParams
from ..phases import RANKINGS
from ..validation.curve import curve_cost, curve_sizes, refinement_steps, widest_gap
from ..validation.validate import validate_cost
from .model import ModelFacts, carved_facts
from .probe import CostModel, ForwardCosts, probe, typical_image

GIB = 2**30
NATIVE_HELD_FACTOR = 2.0  # resident bytes per byte of int8 copies and dequantized tables (fit, module doc)
PROCESS_GIB = 0.5  # Python, torch and transformers loaded: what a tiny model's pass peaks at (0.54 GiB)
LOAD_PEAK_PER_STORED_BYTE = 1.4  # load_model of full_size_random 3B: 10.2 GiB peak, 7.5 GB written
DEFAULT_PIXELS = (56 * 56, 28 * 28 * 1280)  # Qwen2VLImageProcessor's own bounds
CARVED_VOCAB_PER_SAMPLE = 64  # vocabulary rows a carved copy keeps, at most, per sample (plus specials)
GROUP_MAX = 3  # ops of the largest fused group (q/k/v) a kept op widens to in a shipped list
Kept = int | tuple[int, int]  # ops a configuration keeps: a count, or a range (lo, hi) of counts
RUNTIME_FILES = {"sensitivity": "sensitivity.json", "crosscheck": "crosscheck.json"}
RUNTIME_PARAMS_TOLERANCE = 0.05  # a runtime file of a model this close in size counts as the same model
LIGHT_STAGES = {
    "check_params": "check params.yaml and the paths it names",
    "fallback_list": "choose the keep-list, write the exports",
    "rank_report": "report and plots",
}


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    memory_gib: float
    gpu: str | None
    gpu_memory_gib: float | None

    def label(self) -> str:
        gpu = f"{self.gpu} ({self.gpu_memory_gib:.0f} GiB)" if self.gpu else "no CUDA device"
        return f"{self.cpu}, {self.cores} cores, {self.memory_gib:.1f} GiB, {gpu}"

    def memory(self, device: str) -> float:
        return self.gpu_memory_gib if device.startswith("cuda") and self.gpu_memory_gib else self.memory_gib


def this_machine() -> Machine:
    host = host_facts()  # the same facts the runtime files record, so they can be matched
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    gpu = gpu_memory = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        gpu_memory = torch.cuda.get_device_properties(0).total_memory / GIB
    return Machine(host["cpu"], host["cpu_count"] or 1, memory, gpu, gpu_memory)


@dataclass
class StagePlan:
    stage: str
    work: str
    device: str = "-"
    seconds: float | None = None
    basis: str = ""  # where the seconds come from
    memory_gib: float | None = None
    memory_device: str = "cpu"


@dataclass
class Plan:
    machine: Machine
    model: ModelFacts
    stages: list[StagePlan] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)
    probes: list[ForwardCosts] = field(default_factory=list)  # one per numerics probed

    def table(self) -> str:
        rows = [
            [
                s.stage,
                s.device,
                _duration(s.seconds) if s.seconds is not None else s.basis or "-",
                "-" if s.memory_gib is None else f"{s.memory_gib:.1f} GiB",
                s.work,
            ]
            for s in self.stages
        ]
        return tabulate(rows, headers=["stage", "device", "time", "peak memory", "will do"])

    def lines(self) -> list[str]:
        out = [f"machine: {self.machine.label()}", f"model: {self.model.label()}"]
        for p in self.probes:

            def ms(unit: str, p=p) -> str:
                return f"{p.seconds('int8', unit, 1) * 1e3:.1f} / {p.seconds('fp32', unit, 1) * 1e3:.1f}"

            out.append(
                f"probe ({p.probe_seconds:.1f} s on {p.device}, {p.arithmetic}, a sample of "
                f"{p.image_tokens} image + {p.text_tokens} text tokens), ms per forward int8 / fp32: "
                f"a decoder layer {ms('text_layer')}, a vision block {ms('vision_block')}, "
                f"lm_head {ms('head')}"
            )
        if not self.stages:
            return [*out, "nothing to run: every stage is up to date"]
        total = [s.seconds for s in self.stages if s.seconds is not None]
        missing = [s.stage for s in self.stages if s.basis.startswith("not estimated")]
        summary = (
            f"expected: {_duration(sum(total))} for the stages with an estimate (forward probe or this "
            "machine's runtime files; INC's per-op loop only from a runtime file)"
        )
        if missing:
            summary += f"; not estimated: {', '.join(missing)}"
        return [*out, "", self.table(), "", summary]


def _params_words(n: int) -> str:
    return f"~{n / 1e6:.0f} M params" if n >= 10**6 else f"~{n:,} params"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def inside(gap: tuple[int, int]) -> tuple[int, int]:
    """The counts a bisection can measure strictly inside a grid gap."""
    return gap[0] + 1, max(gap[0] + 1, gap[1] - 1)


def native_peak_gib(facts: ModelFacts, scored: list[str], scheme: str = "inc_cpu") -> float:
    """See the module doc: the native engine's peak for a pass scoring ``scored`` under ``scheme``."""
    chosen = set(scored)
    ops = [op for op in facts.ops if op.name in chosen]
    int8 = sum(op.params for op in ops if op.type != "Embedding")
    tables = sum(op.params for op in ops if op.type == "Embedding")
    largest = max((op.params for op in facts.ops), default=0)  # every op, kept ones too, is upcast per call
    held = NATIVE_HELD_FACTOR * (int8 + 4 * tables)
    transient = 2 * 4 * largest
    if scheme != "inc_cpu":  # a scheme's weight is dequantized from its codes per call: one float more
        transient += 4 * max((op.params for op in ops), default=0)
    return PROCESS_GIB + (facts.stored_bytes + held + transient) / GIB


# A quantize target's own peak (write, read-back, load and a forward in one process), per byte of
# the stored model where measured at 3B (benchmarks/results/quantize-3b-*-cpu-2026-11-27.json, 7.0
# GiB of bf16 weights): compressed_tensors 10.9 GiB (the model as stored, its int8 codes, the file;
# loaded decompressed in the stored dtype), modelopt_int8 19.9 GiB and modelopt_fp8 20.1 GiB
# (the writer's model and the export, then a fresh model with ModelOpt's quantizers fed from the
# checkpoint).
TARGET_PER_STORED_BYTE = {"compressed_tensors": 1.6, "modelopt_int8": 2.9, "modelopt_fp8": 2.9}
# ort_qdq exports float32 (the upcast model, the traced graph and its protobuf, ORT's calibrator and
# quantize_static each with a copy), so its peak follows the float32 bytes: measured at the 3B
# width cut to 2 and 6 decoder layers and 8 vision blocks
# (benchmarks/results/cpu-2026-12-04/quantize_3b_width_ort_qdq_{2,6}layers.json): 10.42 GiB for
# 2.46 GiB of float32 weights, 13.67 GiB for 3.61, so GiB = 3.47 + 2.83 per float32 GiB. The whole
# 3B (13.99 GiB in float32) gives 43 GiB: an extrapolation of those two points, not a measurement.
TARGET_FP32_FIT = {"ort_qdq": (3.47, 2.83)}


def target_gib(target: str, facts: ModelFacts) -> float:
    """A quantize target's own peak (module doc of ``op_sensitivity.quantize``'s backends)."""
    if target == "inc":
        return inc_peak_gib(facts.params)
    if target in TARGET_PER_STORED_BYTE:
        return TARGET_PER_STORED_BYTE[target] * facts.stored_bytes / GIB
    base, per_gib = TARGET_FP32_FIT[target]
    return base + per_gib * 4 * facts.params / GIB


class Planner:
    """Builds the :class:`Plan` stage by stage (the counts of one stage may need another's)."""

    def __init__(
        self,
        params: Params,
        facts: ModelFacts,
        machine: Machine,
        runtime_dir: Path | None = None,
        probe_forward: bool = True,
    ):
        self.p, self.facts, self.machine = params, facts, machine
        self.runtime_dir = runtime_dir
        self.probe_forward = probe_forward
        self.costs: dict[tuple, ForwardCosts] = {}
        self.image: tuple[int, int] | None = None  # (width, height) of a calibration image
        self.layers = facts.config.text_config.num_hidden_layers
        self.blocks = facts.config.vision_config.depth
        self.vision = params.captions.mode == "image_caption"

    # -- what a pass scores, where ------------------------------------------------------------
    def device(self, sens: SensitivityParams) -> str:
        """The native engine's device on *this plan's* machine (``engines.numerics.resolve_device``'s
        rule, read from :class:`Machine` so a plan can be made for a machine described by hand)."""
        setting = sens.native.device
        if setting == "cuda" and self.machine.gpu is None:
            raise InputError(
                f"{sens.where('native.device')}: cuda, but this machine has no CUDA device (set it to "
                "auto or cpu, or run on a GPU machine)"
            )
        return "cuda" if setting == "cuda" or (setting == "auto" and self.machine.gpu) else "cpu"

    def scored(self, sens: SensitivityParams) -> list[str]:
        sens, excluded, _ = exclusions(sens, self.facts.ops, self.p.captions.mode)
        skip = {e.op_name for e in excluded}
        scored = [op.name for op in self.facts.ops if op.name not in skip]
        check_scored(sens, len(scored))
        return scored

    # -- seconds -------------------------------------------------------------------------------
    def forward_costs(self, sens: SensitivityParams | None = None) -> ForwardCosts | None:
        """The probe for a pass's numerics (once per device, dtype, arithmetic and scheme)."""
        if not self.probe_forward:
            return None
        numerics = resolve_numerics(sens or self.p.sensitivity)
        key = (str(numerics.device), numerics.dtype_name, numerics.arithmetic, numerics.scheme.name)
        if key not in self.costs:
            m, c = self.p.model, self.p.captions
            pixels = (m.min_pixels or DEFAULT_PIXELS[0], m.max_pixels or DEFAULT_PIXELS[1])
            if self.image is None:
                self.image = typical_image(c.annotations, c.max_side)
            stored = torch.bfloat16 if self.facts.stored_bytes_per_param == 2 else torch.float32
            self.costs[key] = probe(self.facts.config, stored, numerics, self.image, pixels)
        return self.costs[key]

    def runtime_seconds_per_op(
        self, stage: str, engine: str, params: int, device: str, ops: int
    ) -> float | None:
        """Seconds per op of a pass this machine ran: same engine, device, model size and number of
        scored ops (a trial's cost depends on how many of the others are int8), from its runtime file."""
        name = RUNTIME_FILES.get(stage)
        if stage.startswith("scheme_sensitivity@"):  # dvc.yaml: reports/runtime/schemes/<scheme>.json
            name = f"schemes/{stage.partition('@')[2]}.json"
        if self.runtime_dir is None or name is None:
            return None
        path = self.runtime_dir / name
        try:  # engines.runner.runtime_file; the carved crosscheck's holds both engines' passes
            doc = next(d for d in json.loads(path.read_text())["passes"] if d.get("engine") == engine)
        except (OSError, ValueError, KeyError, StopIteration, TypeError, AttributeError):
            return None
        host, here = doc.get("host") or {}, self.machine
        ran = doc.get("model_params")
        same = (
            doc.get("engine") == engine
            and doc.get("ops") == ops
            # the same model; a carved copy's size moves with the vocabulary rows its batches use
            and isinstance(ran, int)
            and abs(ran - params) <= RUNTIME_PARAMS_TOLERANCE * params
            and host.get("cpu") == here.cpu
            and host.get("cpu_count") == here.cores
            and host.get("gpu") == here.gpu
            and (engine == "inc" or doc.get("device") == device)
        )
        return doc.get("seconds_per_op") if same else None

    def cost_model(self, sens: SensitivityParams | None = None) -> CostModel | None:
        costs = self.forward_costs(sens)
        if costs is None:
            return None
        return CostModel(costs, self.facts.ops, self.layers, self.blocks, self.vision)

    def native_seconds(self, sens: SensitivityParams, scored: list[str]) -> tuple[float | None, str]:
        model = self.cost_model(sens)
        if model is None:
            return None, "not estimated"
        cumulative = sens.native.requant_mode == "cumulative"
        per_batch = model.pass_seconds(scored, sens.native.suffix_reuse, cumulative, sens.batch_size)
        # One GPU per process divides the trials; on the CPU the processes share the same cores
        # (each with the stage's thread count, so the values do not depend on them): no speedup.
        shards = sens.native.processes if self.device(sens) == "cuda" else 1
        setup = model.setup_seconds(scored)
        seconds = per_batch * sens.confidence_batches / shards + setup
        n = sens.native
        if n.screening == "first_order":
            # which ops contention measures is known only after the estimate: the audit and three
            # exact_top per phase assumed, with the points before them on the cumulative curve
            exact = min(3 * (n.audit + 3 * n.exact_top), 2 * len(scored))
            if n.exact_budget is not None:  # per phase: audit, check, budget; requant x2 (points before)
                exact = min(exact, 3 * (n.audit + check_sample(n.audit) + n.exact_budget))
            per_batch = model.first_order_seconds(
                scored, n.suffix_reuse, sens.batch_size, n.first_order_points, n.first_order_probes, exact
            )
            return per_batch * sens.confidence_batches + setup, (
                f"probe; first_order: {n.first_order_points} sweeps + {n.first_order_probes} probes a "
                f"batch (a backward taken as 2 forwards), about {exact} exact trials a batch assumed "
                + (
                    "(all of them if the audit widens the bound)"
                    if n.exact_budget is None
                    else f"(at most, with exact_budget {n.exact_budget})"
                )
            )
        if sens.native.screening != "none":  # the probe is float32; which ops refine is known only after
            return 2 * seconds - setup, "probe; screening: at most a float32 screen + every op refined"
        return seconds, "probe"

    # -- stages --------------------------------------------------------------------------------
    def prepare_captions(self) -> StagePlan:
        c = self.p.captions
        return StagePlan(
            "prepare_captions",
            f"draw {c.count} calibration + {c.selection_count} selection + {c.test_count} test pairs "
            f"({c.mode}) from {c.annotations.name}",
        )

    def load_model(self) -> StagePlan:
        m, f = self.p.model, self.facts
        if m.source == "hf_dir":
            work = f"hash the snapshot {m.input} and derive processor and card (weights not copied)"
            peak = f.stored_bytes * 1.1 / GIB
        elif m.source == "full_size_random":
            work = (
                f"build the published {m.full_size} architecture, random weights: writes "
                f"{f.stored_bytes / 1e9:.1f} GB"
            )
            peak = f.stored_bytes * LOAD_PEAK_PER_STORED_BYTE / GIB
        else:
            work = "train the tokenizer and build the embedded tiny model"
            peak = None
        return StagePlan("load_model", work, "cpu", memory_gib=peak)

    def sensitivity(self, sens: SensitivityParams, stage: str) -> StagePlan:
        scored = self.scored(sens)
        n, b = len(scored), sens.confidence_batches
        if sens.engine == "inc":
            per_op = self.runtime_seconds_per_op(stage, "inc", self.facts.params, "cpu", n)
            seconds = per_op * 2 * b * n if per_op else None
            return StagePlan(
                stage,
                f"INC pass: {n} ops x 2 phases x {b} batches: {2 * n * b} per-op model copies",
                "cpu",
                seconds,
                "runtime file" if per_op else "not estimated",
                inc_peak_gib(self.facts.params),
            )
        device = self.device(sens)
        scheme = sens.native.scheme
        per_op = self.runtime_seconds_per_op(stage, "native", self.facts.params, device, n)
        seconds, basis = (per_op * 2 * b * n, "runtime file") if per_op else self.native_seconds(sens, scored)
        trials = f"{b * (2 * n + 1)} trials"
        if sens.native.screening == "first_order":
            sweeps = sens.native.first_order_points
            trials = f"estimated ({sweeps} forward+backward sweeps a batch), exact where it decides"
        return StagePlan(
            stage,
            f"native ({scheme}): {n} ops x 2 phases x {b} batches of {sens.batch_size}: {trials}",
            device,
            seconds,
            basis,
            native_peak_gib(self.facts, scored, scheme),
            device,
        )

    def scheme_sensitivity(self, name: str) -> StagePlan:
        sens = scheme_params(self.p.sensitivity, name, self.p.schemes)
        return self.sensitivity(sens, f"scheme_sensitivity@{name}")

    def carved(self) -> tuple[int, int]:
        """(parameters, ops) of the crosscheck's carved copy, its vocabulary rows bounded by the
        samples it reads (calibration and test: ``CARVED_VOCAB_PER_SAMPLE`` each, and the special
        tokens)."""
        c, check = self.p.captions, self.p.crosscheck
        rows = (c.count + c.test_count) * CARVED_VOCAB_PER_SAMPLE + 64
        return carved_facts(self.facts, check.carve_layers, check.carve_vision_blocks, rows)

    def crosscheck(self) -> StagePlan:
        sens, check, f = self.p.sensitivity, self.p.crosscheck, self.facts
        b = check.checked_batches(sens.confidence_batches)
        if check.carves_crosscheck(f.params):
            params, n = self.carved()
            what = (
                f"INC and native on a carved copy ({check.carve_layers} of {self.layers} layers, "
                f"{check.carve_vision_blocks} of {self.blocks} vision blocks, {_params_words(params)}): "
                f"{n} ops x 2 phases x {b} batches each"
            )
        else:
            inc_cpu = replace(sens, native=replace(sens.native, scheme="inc_cpu"))
            params, n = f.params, len(self.scored(inc_cpu))
            other = "native" if sens.engine == "inc" else "INC"
            what = f"{other} rerun on the whole model: {n} ops x 2 phases x {b} batches"
        per_op = self.runtime_seconds_per_op("crosscheck", "inc", params, "cpu", n)
        seconds, basis = (per_op * 2 * b * n, "runtime file") if per_op else (None, "not estimated (INC)")
        peak = inc_peak_gib(params)
        if not check.carves_crosscheck(f.params) and sens.engine == "inc":  # the rerun is the native pass
            seconds, basis = self.native_seconds(replace(sens, confidence_batches=b), self.scored(sens))
            peak = native_peak_gib(f, self.scored(sens))
        return StagePlan("crosscheck", what, "cpu", seconds, basis, peak)

    def measurer_seconds(
        self, scored: list[str], held_out: list[Kept], calibration: list[Kept], samples: int
    ) -> tuple[float | None, str]:
        """The curve's, fallback_list's and validate's measurer: calibrated once over the
        calibration split, fp32 references on both splits (the held-out one has ``samples``:
        selection for the curve and the walk, test for validate), then each configuration over
        its split in forwards of ``curve.batch_size``. A configuration is costed by how many ops
        it keeps in high precision (``Kept``: a count, or a range of counts where only the range
        is known, costed at its dearer end), and as the dearest ops of that count
        (:meth:`CostModel.dearest_split_seconds`: which ops is known only after the ranking). The
        estimate errs high, as a bound should."""
        model = self.cost_model()
        if model is None:
            return None, "not estimated"
        c, bs = self.p.captions.count, self.p.curve.batch_size
        seen: dict[tuple[int, int], float] = {}

        def config(n: int, split: int) -> float:
            if (n, split) not in seen:
                seen[n, split] = model.dearest_split_seconds(scored, n, split, bs)
            return seen[n, split]

        def kept(k: Kept, split: int) -> float:
            return config(k, split) if isinstance(k, int) else max(config(k[0], split), config(k[1], split))

        n = len(scored)
        setup = config(n, c) * model.costs.observe_factor + config(n, c) + config(n, samples)
        setup += model.costs.setup_per_param * sum(model.params[m] for m in scored)
        configs = sum(kept(k, samples) for k in held_out) + sum(kept(k, c) for k in calibration)
        return setup + configs, "probe; each configuration by the ops it keeps (the dearer ones)"

    def curve(self) -> StagePlan:
        sens, cp = self.p.sensitivity, self.p.curve
        scored = self.scored(sens)
        n = len(scored)
        cost = curve_cost(n, cp)
        sizes = curve_sizes(n, cp.max_points)
        inner = [k for k in sizes if 0 < k < n]
        held_out: list[Kept] = [0, n, *inner * (len(RANKINGS) + cp.random_lists)]
        held_out += [inside(widest_gap(sizes))] * cost["refinement_max"]
        # the references and the single-op damage (each op int8 alone) on the calibration split
        seconds, basis = self.measurer_seconds(
            scored, held_out, [0] + [n - 1] * cost["single_op_max"], self.p.captions.selection_count
        )
        return StagePlan(
            "curve",
            f"{n} ops, {cost['sizes']} sizes: <= {cost['total_max']} configurations ("
            f"{cost['single_op_max'] + 1} x {self.p.captions.count} calibration samples, the rest x "
            f"{self.p.captions.selection_count} selection samples)",
            self.device(sens),
            seconds,
            basis,
            native_peak_gib(self.facts, scored),
            self.device(sens),
        )

    def fallback_list(self) -> StagePlan:
        """Light, but for measured_budget: it measures the lists it would ship on the selection
        split (the curve's model and measurer, at most :func:`walk_cost` lists: n = 0 up, then
        the curve's largest sizes at most)."""
        if self.p.fallback.policy != "measured_budget":
            return StagePlan("fallback_list", LIGHT_STAGES["fallback_list"])
        sens = self.p.sensitivity
        scored = self.scored(sens)
        n, lists = len(scored), walk_cost(len(scored))
        # a shipped list of the top k: always_keep's ops added and every fused group widened (at
        # most GROUP_MAX ops an op); the distinct lists from k = 0 up, then the curve's sizes
        forced = GROUP_MAX * sum(any(fnmatchcase(m, g) for g in self.p.fallback.always_keep) for m in scored)
        tops = list(range(min(n + 1, SCAN_MAX)))
        tops += curve_sizes(n, self.p.curve.max_points)[::-1][: lists - len(tops)]
        walk: list[Kept] = [min(n, forced + GROUP_MAX * k) for k in tops]
        seconds, basis = self.measurer_seconds(scored, walk, [], self.p.captions.selection_count)
        return StagePlan(
            "fallback_list",
            f"measured_budget: <= {lists} shipped lists x {self.p.captions.selection_count} selection "
            "samples, then the exports",
            self.device(sens),
            seconds,
            basis,
            native_peak_gib(self.facts, scored),
            self.device(sens),
        )

    def validate(self) -> StagePlan:
        sens, check, f = self.p.sensitivity, self.p.crosscheck, self.facts
        scored = self.scored(sens)
        n, cp = len(scored), self.p.curve
        cost = validate_cost(n, cp)
        sizes = curve_sizes(n, cp.max_points)
        steps = len(cp.crossings) * refinement_steps(sizes, cp.crossing_tolerance)
        row = [k for k in sizes if 0 < k < n] + [inside(widest_gap(sizes))] * steps
        # the list's size is known only after fallback_list: anywhere from none to every op
        held_out: list[Kept] = [0, n, *[(0, n)] * (cost["keep_list"] - 2)]
        held_out += row * (len(RANKINGS) + cp.random_lists)
        seconds, basis = self.measurer_seconds(scored, held_out, [], self.p.captions.test_count)
        work = (
            f"<= {cost['total_max']} test configurations ({cost['keep_list']} for the list, <= "
            f"{cost['rankings_max']} for the rankings' crossings)"
        )
        peak = native_peak_gib(f, scored)
        if self.p.validate.inc_check:
            if check.carves(f.params):
                params, _ = self.carved()
                work += f" + INC PTQ on the carved copy (~{params / 1e6:.0f} M params)"
            else:
                params = f.params
                work += " + INC PTQ of the whole model"
            peak = max(peak, inc_peak_gib(params))
            basis += "; INC PTQ not estimated" if seconds is not None else ""
        return StagePlan("validate", work, self.device(sens), seconds, basis, peak, self.device(sens))

    def quantize(self, target: str) -> StagePlan:
        """A target's artifact, written and loaded after the measurer (the native engine under the
        target's scheme, on the test split) is released: the larger of the two peaks."""
        sens, f = self.p.sensitivity, self.facts
        scheme = TARGET_SCHEMES[target]
        scored = self.scored(sens)
        work = f"write the {target} artifact from the {scheme} keep-list, load it, score it on the test split"
        peak = max(native_peak_gib(f, scored, scheme), target_gib(target, f))
        return StagePlan(f"quantize@{target}", work, "cpu", None, "not estimated", peak)

    def plan(self, stages: list[str]) -> Plan:
        out = Plan(self.machine, self.facts)
        for stage in stages:
            if stage.startswith("scheme_sensitivity@"):
                out.stages.append(self.scheme_sensitivity(stage.partition("@")[2]))
            elif stage.startswith("quantize@"):
                out.stages.append(self.quantize(stage.partition("@")[2]))
            elif stage == "sensitivity":
                out.stages.append(self.sensitivity(self.p.sensitivity, "sensitivity"))
            elif hasattr(self, stage):
                out.stages.append(getattr(self, stage)())
            else:
                out.stages.append(StagePlan(stage, LIGHT_STAGES.get(stage, "")))
        out.probes = list(self.costs.values())
        out.stops = self.stops(out)
        return out

    # -- what cannot fit -----------------------------------------------------------------------
    def stops(self, plan: Plan) -> list[str]:
        """One line per stage whose memory estimate exceeds this machine's, naming what to change."""
        out = []
        for s in plan.stages:
            have = self.machine.memory(s.memory_device)
            if s.memory_gib is not None and s.memory_gib > have:
                out.append(self._stop(s, f"needs ~{s.memory_gib:.0f} GiB, this machine has {have:.0f} GiB"))
        return out

    def _stop(self, s: StagePlan, need: str) -> str:
        p, params = self.p, self.facts.params
        whole = not p.crosscheck.carves_crosscheck(params)
        if s.stage == "crosscheck" and whole:
            return (
                f"{p.crosscheck.where('whole_max_params')}: INC on the whole model ({params:,} "
                f"parameters) {need}; set it below {params:,} to check INC on a carved copy"
            )
        if s.stage == "crosscheck":
            return (
                f"{p.crosscheck.where('carve_layers')}: INC on the carved copy {need}; lower "
                "carve_layers / carve_vision_blocks"
            )
        if s.stage == "validate" and "INC" in s.work and whole:
            return (
                f"{p.crosscheck.where('whole_max_params')}: INC's PTQ of the whole model {need}; set it "
                f"below {params:,} (INC PTQ on a carved copy) or {p.validate.where('inc_check')}: false"
            )
        if s.stage.startswith("quantize@"):
            target = s.stage.partition("@")[2]
            refused = (
                f" (and it refuses a model above {p.crosscheck.where('whole_max_params')})"
                if target == "inc" and not whole
                else ""
            )
            return f"{p.quantize.where('targets')}: {target} {need}{refused}; drop it from the list"
        if "INC pass" in s.work:
            return (
                f"{p.sensitivity.where('engine')}: the INC pass {need} (INC copies the float32 model "
                "for every op); set it to native"
            )
        return (
            f"{p.sensitivity.where('op_name_dict')}: stage {s.stage} {need} (an int8 copy of every op "
            "it scores); keep ops fp32 with sensitivity.op_name_dict, or use a machine (or GPU) with "
            "more memory"
        )


def build_plan(
    params: Params,
    facts: ModelFacts,
    stages: list[str],
    machine: Machine | None = None,
    runtime_dir: Path | None = None,
    probe_forward: bool = True,
) -> Plan:
    """The plan for ``stages``; raises :class:`InputError` (naming the param) where a stage's params
    cannot run here at all (no CUDA device, more than ``max_ops``)."""
    planner = Planner(params, facts, machine or this_machine(), runtime_dir, probe_forward)
    return planner.plan(stages)


def check(plan: Plan) -> None:
    if plan.stops:
        raise InputError(plan.stops[0])
