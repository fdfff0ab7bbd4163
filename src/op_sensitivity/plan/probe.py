"""A probe of a few seconds: the seconds of one sample's forward at the model's real widths, by part.

Why a probe: a trial's cost depends on the widths, the token count, the device, the compute
dtype and the arithmetic, and on which part of the model it recomputes (with suffix reuse a
trial reruns from its op's decoder layer or vision block onward). Building the whole model
takes minutes at 3B; one decoder layer and one vision block at the same widths, with the same
embedding and ``lm_head``, take seconds, and every other layer costs what that one does.

The probe builds that model (``model.carve.carved_config(config, 1, 1)``, random weights in the
stored dtype, at most :data:`PROBE_VOCAB` vocabulary rows: ``lm_head``'s seconds are scaled to
the real vocabulary) on the pass's device, wraps every op in the native engine's ``FakeQuantModel``
with the pass's numerics, calibrates it once on a synthetic sample of the calibration's size
(an image of the size the processor will produce and :data:`TEXT_TOKENS` text tokens), then
times int8 forwards with hooks on the vision tower, its block, the language model, its layer
and ``lm_head``. The parts scale to the full depth linearly (:class:`ForwardCosts`).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.initialization import no_init_weights
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ..engines.contract import scheme_exclusion
from ..engines.fakequant import FakeQuantModel
from ..engines.numerics import Numerics
from ..errors import InputError
from ..inventory import op_inventory
from ..model.carve import TEXT_TOKEN_FIELDS, TOKEN_FIELDS, carved_config
from ..model.processor import image_token_types

TEXT_TOKENS = 40  # chat template + a COCO caption, about (both towers' token counts are probed)
TIMED_FORWARDS = 2  # after one warm-up forward
PROBE_VOCAB = 16384  # vocabulary rows of the probe model; lm_head's seconds are scaled to the real count


UNITS = ("vision_pre", "vision_block", "vision_post", "text_pre", "text_layer", "head")


def unit_of(op: str) -> tuple[str, int]:
    """Where an op sits in the forward: (unit kind, block index)."""
    block = re.search(r"(?:^|\.)visual\.blocks\.(\d+)\.", op)
    if block:
        return "vision_block", int(block.group(1))
    if re.search(r"(?:^|\.)visual\.", op):
        return ("vision_post", 0) if ".merger." in op else ("vision_pre", 0)
    layer = re.search(r"\.layers\.(\d+)\.", op)
    if layer:
        return "text_layer", int(layer.group(1))
    return ("head", 0) if op == "lm_head" or op.startswith("lm_head.") else ("text_pre", 0)


Cost = tuple[float, float]  # (seconds per forward call, seconds per sample in it)


@dataclass(frozen=True)
class ForwardCosts:
    """Seconds of a forward by unit, with every op of the unit int8 and with every op in high
    precision (the stored weight upcast per call, as the engine computes kept ops), each split
    into a part per call and a part per sample (the probe times batches of 1 and 2): on a CPU
    the per-call part (every weight read, and upcast from its stored dtype into a reused buffer:
    ``engines.weight_copies``) weighs heavily in a float32 layer at a few dozen tokens, and the
    int8 kernels are several times faster than float32, so a pass that scores a handful of ops
    costs far more per trial than one that scores all of them, and a batch of two costs far less
    than two batches of one."""

    int8: dict[str, Cost]  # unit kind -> (per call, per sample); one block of a kind that repeats
    fp32: dict[str, Cost]
    observe_factor: float  # a calibration forward (observers on every op) / an fp32 forward
    setup_per_param: float  # seconds per scored parameter to fix qparams and build its int8 weight
    device: str
    arithmetic: str
    probe_seconds: float
    image_tokens: int
    text_tokens: int

    def seconds(self, state: str, unit: str, samples: int) -> float:
        call, sample = (self.int8 if state == "int8" else self.fp32)[unit]
        return call + samples * sample


# A backward through the model (input gradients only: no weight is trained) in fp32 forwards:
# assumed, not probed; benchmarks/first_order_agreement.py measures the sweep's real cost
BACKWARD_PER_FORWARD = 2.0


class CostModel:
    """A forward of the whole model from :class:`ForwardCosts`: each unit (a vision block, a
    decoder layer, the towers' ends, ``lm_head``) costs its fp32 seconds plus the share of its
    weights that is int8 times the int8 - fp32 difference. A trial recomputes from its op's unit
    onward with suffix reuse (vision units only for a vision op: the tower's output is cached
    while text ops toggle), as ``engines.reuse`` does. ``samples``: per forward call."""

    def __init__(self, costs: ForwardCosts, ops: list, layers: int, blocks: int, vision: bool = True):
        self.costs = costs
        self.units = [("vision_pre", 0), *(("vision_block", j) for j in range(blocks)), ("vision_post", 0)]
        self.units = (self.units if vision else []) + [
            ("text_pre", 0),
            *(("text_layer", i) for i in range(layers)),
            ("head", 0),
        ]
        self.index = {u: i for i, u in enumerate(self.units)}
        self.params = {op.name: op.params for op in ops}
        self.unit = {op.name: unit_of(op.name) for op in ops}
        self.unit_params = dict.fromkeys(self.units, 0)
        for op in ops:
            if self.unit[op.name] in self.unit_params:
                self.unit_params[self.unit[op.name]] += op.params

    def unit_costs(self, int8: set[str], samples: int = 1) -> list[float]:
        share = dict.fromkeys(self.units, 0)
        for name in int8:
            if self.unit.get(name) in share:
                share[self.unit[name]] += self.params[name]
        out = []
        for u in self.units:
            lo = self.costs.seconds("fp32", u[0], samples)
            hi = self.costs.seconds("int8", u[0], samples)
            frac = share[u] / self.unit_params[u] if self.unit_params[u] else 0.0
            out.append(lo + frac * (hi - lo))
        return out

    def forward(self, int8: set[str], samples: int = 1) -> float:
        return sum(self.unit_costs(int8, samples))

    def first_unit(self, op: str, suffix_reuse: bool) -> int:
        u = self.unit[op]
        vision_op = u[0].startswith("vision")
        if not suffix_reuse:
            return 0 if vision_op else self.index[("text_pre", 0)]
        return self.index.get(u, 0)

    def setup_seconds(self, scored: list[str]) -> float:
        """Fixing the scored ops' qparams and building their int8 weights, as the probe's first
        calibration measured it; once a pass, since a packed weight is kept across batches
        (``FakeQuantModel._int8_module``)."""
        return self.costs.setup_per_param * sum(self.params[n] for n in scored)

    def pass_seconds(
        self, scored: list[str], suffix_reuse: bool, requant_cumulative: bool = True, samples: int = 1
    ) -> float:
        """One confidence batch of ``samples``: calibration, fp32 reference, all-int8, both phases
        (the int8 weights are built once a pass: :meth:`setup_seconds`)."""
        everything = set(scored)
        fp32 = self.forward(set(), samples)
        seconds = fp32 * self.costs.observe_factor + fp32 + self.forward(everything, samples)
        base = self.unit_costs(everything, samples)
        for op in scored:  # fallback: all int8 but one, from its unit onward
            seconds += sum(base[self.first_unit(op, suffix_reuse) :])
        on: set[str] = set()
        for op in scored:  # requant: quantized one after another (or alone, isolated)
            on = on | {op} if requant_cumulative else {op}
            seconds += sum(self.unit_costs(on, samples)[self.first_unit(op, suffix_reuse) :])
        return seconds

    def first_order_seconds(
        self, scored: list[str], suffix_reuse: bool, samples: int, points: int, probes: int, exact: int
    ) -> float:
        """One confidence batch of a first_order pass (``engines.first_order``): calibration, reference,
        all-int8, ``points`` sweeps (each op computed both ways, then a backward), ``probes`` more
        backwards, and ``exact`` trials (audit and contention, both phases) at the exact pass's
        average trial cost; :meth:`setup_seconds` comes on top, once a pass. A backward is taken
        as :data:`BACKWARD_PER_FORWARD` fp32 forwards."""
        everything = set(scored)
        fp32, int8 = self.forward(set(), samples), self.forward(everything, samples)
        base = fp32 * self.costs.observe_factor + fp32 + int8
        trials = self.pass_seconds(scored, suffix_reuse, True, samples) - base
        sweeps = points * (fp32 + int8 + BACKWARD_PER_FORWARD * fp32) + probes * BACKWARD_PER_FORWARD * fp32
        return base + sweeps + trials * min(exact, 2 * len(scored)) / (2 * len(scored))

    def split_seconds(self, int8: set[str], samples: int, batch_size: int) -> float:
        """One configuration over a split of ``samples`` in forwards of ``batch_size``."""
        calls, left = divmod(samples, batch_size)
        full = calls * self.forward(int8, batch_size)
        return full + (self.forward(int8, left) if left else 0.0)

    def dearest_split_seconds(self, scored: list[str], kept: int, samples: int, batch_size: int) -> float:
        """The most a configuration keeping ``kept`` of ``scored`` in high precision can cost over a
        split, whichever ops they are (the curve's and validate's lists are known only after the
        ranking). A forward is linear in which ops are int8: each kept op moves its unit's cost
        from int8 toward float by its share of the unit's parameters. So the dearest choice keeps
        the ``kept`` ops that add the most (with int8 kernels the largest; under fake quant, where
        the float op may be the cheaper, the least negative)."""
        calls, left = divmod(samples, batch_size)
        sizes = [batch_size] * calls + ([left] if left else [])
        add = []
        for op in scored:
            u = self.unit.get(op)
            if u not in self.unit_params or not self.unit_params[u]:
                add.append(0.0)
                continue
            rise = sum(
                self.costs.seconds("fp32", u[0], b) - self.costs.seconds("int8", u[0], b) for b in sizes
            )
            add.append(rise * self.params[op] / self.unit_params[u])
        return self.split_seconds(set(scored), samples, batch_size) + sum(sorted(add, reverse=True)[:kept])


def probe_sample(
    config: Qwen2_5_VLConfig, image: tuple[int, int], min_pixels: int, max_pixels: int
) -> dict[str, torch.Tensor]:
    """One synthetic sample as the processor would encode it: an image of ``image`` (width,
    height) pixels, resized as ``Qwen2VLImageProcessor`` does, and :data:`TEXT_TOKENS` text tokens."""
    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(image[1], image[0], factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    grid = (1, h // vc.patch_size, w // vc.patch_size)
    patches = grid[1] * grid[2]
    image_tokens = patches // vc.spatial_merge_size**2
    specials = {
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    }
    text = [t for t in range(len(specials) + TEXT_TOKENS + 8) if t not in specials][:TEXT_TOKENS]
    half = TEXT_TOKENS // 2
    ids = [*text[:half], config.vision_start_token_id, *[config.image_token_id] * image_tokens]
    ids += [config.vision_end_token_id, *text[half:]]
    generator = torch.Generator().manual_seed(0)
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(patches, width, generator=generator)
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([grid]),
        "mm_token_type_ids": image_token_types(input_ids, config.image_token_id),
    }


def _clock(device: torch.device):
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    return now


@contextmanager
def _timed(parts: dict[str, nn.Module], device: torch.device) -> Iterator[dict[str, float]]:
    seconds = dict.fromkeys(parts, 0.0)
    starts: dict[str, float] = {}
    now = _clock(device)

    def pre(name):
        return lambda *_: starts.__setitem__(name, now())

    def post(name):
        return lambda *_: seconds.__setitem__(name, seconds[name] + now() - starts[name])

    handles = []
    for name, m in parts.items():
        handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    try:
        yield seconds
    finally:
        for h in handles:
            h.remove()


def probe_config(config: Qwen2_5_VLConfig) -> tuple[Qwen2_5_VLConfig, float]:
    """One decoder layer and one vision block at ``config``'s widths, and at most
    :data:`PROBE_VOCAB` vocabulary rows (special tokens renumbered into them); with the factor
    that scales the probed ``lm_head`` seconds back to the full vocabulary (its cost is linear in
    the rows: a [tokens x hidden] by [hidden x rows] product)."""
    small = carved_config(config, 1, 1)
    vocab = small.text_config.vocab_size
    if vocab <= PROBE_VOCAB:
        return small, 1.0
    small.text_config.vocab_size = PROBE_VOCAB
    for i, name in enumerate(TOKEN_FIELDS):
        setattr(small, name, PROBE_VOCAB - 1 - i)
    for name in TEXT_TOKEN_FIELDS:
        setattr(small.text_config, name, None)
    return small, vocab / PROBE_VOCAB


def probe(
    config: Qwen2_5_VLConfig,
    stored_dtype: torch.dtype,
    numerics: Numerics,
    image: tuple[int, int],
    pixels: tuple[int, int],
) -> ForwardCosts:
    """Build the one-layer model, run the native engine's arithmetic on it, time it by part.

    ``image``: (width, height) of a calibration image, ``pixels``: the processor's (min, max)
    bounds (:func:`probe_sample`)."""
    start = time.perf_counter()
    small, head_scale = probe_config(config)
    sample = probe_sample(small, image, *pixels)
    model = _random_model(small, stored_dtype)
    inventory, kept = [], []
    for op in op_inventory(model):  # what the scheme's tool leaves in high precision stays there
        (kept if scheme_exclusion(numerics.scheme, op.name, op.type) else inventory).append(op)
    names = [op.name for op in inventory]
    kept = [op.name for op in kept]
    model = numerics.prepare(model, {*names, *kept})
    fq = FakeQuantModel(
        model, names, numerics.reduce_range, numerics.arithmetic, numerics.dtype, kept, numerics.scheme
    )
    batches = {1: numerics.batch(sample), 2: numerics.batch(_twice(sample))}
    batch = batches[1]
    inner = model.model
    parts = {
        "visual": inner.visual,
        "vision_block": inner.visual.blocks[0],
        "vision_post": inner.visual.merger,
        "text_layer": inner.language_model.layers[0],
        "head": model.lm_head,
        "all": model,
    }
    seconds: dict[tuple[str, int], dict[str, float]] = {}
    try:
        with torch.no_grad():
            clock = _clock(numerics.device)
            begin = clock()
            with _timed({"all": model}, numerics.device) as observed:
                fq.calibrate([batch])
            calibrate = clock() - begin
            for state in ("fp32", "int8"):
                fq.set_all(state == "int8")
                model(**batch)  # warm-up
                for size, b in batches.items():
                    with _timed(parts, numerics.device) as t:
                        for _ in range(TIMED_FORWARDS):
                            model(**b)
                    seconds[state, size] = {k: v / TIMED_FORWARDS for k, v in t.items()}
    finally:
        fq.remove()
    units = {
        state: {
            unit: _split(one, two)
            for unit, one, two in zip(
                UNITS,
                _units(seconds[state, 1], head_scale).values(),
                _units(seconds[state, 2], head_scale).values(),
                strict=True,
            )
        }
        for state in ("fp32", "int8")
    }
    scored_params = sum(op.params for op in inventory)
    vision_tokens = int((sample["input_ids"] == small.image_token_id).sum())
    return ForwardCosts(
        int8=units["int8"],
        fp32=units["fp32"],
        observe_factor=observed["all"] / max(seconds["fp32", 1]["all"], 1e-9),
        setup_per_param=max(calibrate - observed["all"], 0.0) / max(scored_params, 1),
        device=str(numerics.device),
        arithmetic=f"{numerics.scheme.name} {numerics.arithmetic}",
        probe_seconds=time.perf_counter() - start,
        image_tokens=vision_tokens,
        text_tokens=int(sample["input_ids"].shape[1]) - vision_tokens,
    )


def _split(one: float, two: float) -> Cost:
    """(per call, per sample) from the seconds of a batch of one and of two; each part >= 0."""
    per_sample = min(max(two - one, 0.0), one)
    return one - per_sample, per_sample


def _twice(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sample twice in one batch (a second row of tokens, a second image's patches and grid)."""
    return {key: value.repeat(2, 1) for key, value in sample.items()}


def _units(t: dict[str, float], head_scale: float) -> dict[str, float]:
    """Per unit kind, from the hooks' seconds (the text tower's own ends are what is left)."""
    vision_pre = max(t["visual"] - t["vision_block"] - t["vision_post"], 0.0)
    return {
        "vision_pre": vision_pre,
        "vision_block": t["vision_block"],
        "vision_post": t["vision_post"],
        "text_pre": max(t["all"] - t["visual"] - t["text_layer"] - t["head"], 0.0),
        "text_layer": t["text_layer"],
        "head": t["head"] * head_scale,
    }


def _random_model(config: Qwen2_5_VLConfig, dtype: torch.dtype) -> Qwen2_5_VLForConditionalGeneration:
    """The model with seeded random weights in ``dtype``, in a fraction of a second.

    transformers' own initialisation of a 3B-wide embedding takes seconds; a trial's cost does
    not depend on the values, only on their not being NaN or denormal, so every weight is one
    seeded random block of 2**20 values repeated (buffers such as the rotary frequencies are
    computed as usual)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for i in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - i)
                flat[i : i + n].copy_(block[:n])
    return model.eval()


def typical_image(annotations: Path, max_side: int, limit: int = 5000) -> tuple[int, int]:
    """(width, height) of a calibration image as ``prepare_captions`` will write it: the median size
    of the annotation file's images (the first ``limit``), shrunk to ``max_side`` as its copies are."""
    try:
        images = json.loads(annotations.read_text()).get("images", [])[:limit]
        w = statistics.median(int(i["width"]) for i in images)
        h = statistics.median(int(i["height"]) for i in images)
    except (OSError, ValueError, KeyError, TypeError, statistics.StatisticsError) as e:
        raise InputError(f"{annotations}: no image sizes to plan with ({e})") from e
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = w * scale, h * scale
    return max(round(w), 1), max(round(h), 1)
