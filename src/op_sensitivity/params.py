"""Typed, validated view of ``params.yaml`` (one block per stage).

Why: DVC hands stages raw YAML; a wrong type or an out-of-range value should stop a stage
with a message naming ``params.yaml: block.field`` and what was expected, before any work
(a sensitivity pass can take hours), not as a traceback deep inside INC or transformers.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import InputError
from .phases import METRICS, RANKINGS, SELECTABLE_PHASES

CALIBRATION_MODES = ("image_caption", "text_only")
CAPTIONS_PER_IMAGE = ("one", "all")
MODEL_SOURCES = ("tiny", "hf_dir", "full_size_random")
FULL_SIZES = ("3b", "7b")  # published architectures full_size_random builds
DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("inc", "native")
DEVICES = ("auto", "cpu", "cuda")
ARITHMETICS = ("auto", "int8_kernels", "fp8_kernels", "fake_quant")
REQUANT_MODES = ("cumulative", "isolated")
# op_sensitivity.schemes describes each (it checks this tuple against its registry)
SCHEMES = ("inc_cpu", "modelopt_int8", "modelopt_fp8", "llmcompressor_w8a8", "ort_qdq")
POLICIES = ("top_k", "top_fraction", "threshold", "error_budget", "measured_budget", "bits_budget")
BLOCKS = (
    "captions",
    "model",
    "sensitivity",
    "schemes",
    "crosscheck",
    "curve",
    "fallback",
    "validate",
    "report",
)
SCHEME_ARITHMETICS = ("fake_quant", "kernels")

_MISSING = object()


class _Block:
    """Reads typed fields of one params block and reports errors with the full dotted path."""

    def __init__(self, data: Any, path: str, source: str):
        if not isinstance(data, dict):
            raise InputError(f"{source}: {path}: expected a mapping, got {type(data).__name__}")
        self.data, self.path, self.source = data, path, source

    def where(self, key: str) -> str:
        return f"{self.source}: {self.path}.{key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is _MISSING:
                raise InputError(f"{self.where(key)}: missing (expected {_kind_name(kind)})")
            return default
        value = self.data[key]
        # bool is an int subclass: reject it where a number is expected, and vice versa.
        bad_bool = isinstance(value, bool) and bool not in _as_tuple(kind)
        if bad_bool or not isinstance(value, kind):
            raise InputError(f"{self.where(key)}: expected {_kind_name(kind)}, got {value!r}")
        return value

    def int_in(self, key: str, lo: int, hi: int | None = None, default: Any = _MISSING) -> int:
        value = self.get(key, int, default)
        if value < lo or (hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise InputError(f"{self.where(key)}: expected an integer {span}, got {value!r}")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: Any = _MISSING) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise InputError(f"{self.where(key)}: expected one of {', '.join(options)}, got {value!r}")
        return value

    def block(self, key: str) -> _Block:
        return _Block(self.data.get(key, {}), f"{self.path}.{key}", self.source)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        dict: "a mapping",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))


@dataclass(frozen=True)
class ParamsBlock:
    """One block of the params file; remembers the file so every later message can name it."""

    BLOCK: ClassVar[str] = ""
    params_file: str = field(default="params.yaml", compare=False, kw_only=True)

    def where(self, name: str) -> str:
        """``"<params file>: <block>.<name>"``: how every message about a param starts."""
        return f"{self.params_file}: {self.BLOCK}.{name}"


@dataclass(frozen=True)
class CaptionsParams(ParamsBlock):
    """Where the COCO captions live and how the calibration sample is drawn."""

    BLOCK: ClassVar[str] = "captions"
    annotations: Path
    images_dir: Path
    count: int
    eval_count: int  # the held-out split, from images the calibration sample does not use
    seed: int
    captions_per_image: str
    max_side: int
    mode: str


@dataclass(frozen=True)
class TinyModelParams:
    """Reduced Qwen2.5-VL sizes for the embedded default (same architecture, seeded weights)."""

    text: dict[str, int]
    vision: dict[str, int]
    vocab_size: int


@dataclass(frozen=True)
class ModelParams(ParamsBlock):
    """Where the model comes from. ``input`` is the one path the source reads, so the one DVC dep:
    the calibration sample for the random sources (their tokenizer is trained on its captions),
    the snapshot directory for ``hf_dir``."""

    BLOCK: ClassVar[str] = "model"
    source: str
    input: Path
    seed: int
    full_size: str  # with source full_size_random: 3b | 7b
    tiny: TinyModelParams
    min_pixels: int | None
    max_pixels: int | None


@dataclass(frozen=True)
class NativeParams:
    """The native engine's knobs (see ``engines.native``); the defaults are the ones params.yaml may omit."""

    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "float32"  # float32 | bfloat16 | float16
    arithmetic: str = "auto"  # auto | int8_kernels (cpu, bit-exact with INC) | fake_quant (any device)
    reduce_range: str = "auto"  # auto (as INC decides from the CPU) | true | false
    requant_mode: str = "cumulative"  # cumulative (INC's curve) | isolated (only this op int8)
    allow_tf32: bool = False
    suffix_reuse: bool = True  # recompute a trial from the toggled op's block onward (same values)
    processes: int = 1  # shard the trials over this many processes (one GPU each on cuda)
    scheme: str = "inc_cpu"  # the deployment scheme measured (op_sensitivity.schemes)


@dataclass(frozen=True)
class SensitivityParams(ParamsBlock):
    BLOCK: ClassVar[str] = "sensitivity"
    confidence_batches: int
    batch_size: int
    max_ops: int
    tolerable_loss: float
    op_type_dict: dict[str, Any] = field(default_factory=dict)
    op_name_dict: dict[str, Any] = field(default_factory=dict)
    engine: str = "inc"
    native: NativeParams = field(default_factory=NativeParams)


@dataclass(frozen=True)
class SchemesParams(ParamsBlock):
    """Stage scheme_sensitivity: the native pass again under each listed deployment scheme."""

    BLOCK: ClassVar[str] = "schemes"
    run: tuple[str, ...] = ()  # one cached DVC stage per name (foreach), compared in rank_report
    arithmetic: str = "fake_quant"  # fake_quant | kernels (the scheme's int8 / fp8 matmul where it has one)


@dataclass(frozen=True)
class CrosscheckParams(ParamsBlock):
    """Where INC is checked against the native engine (stage crosscheck, validate's INC PTQ check).

    INC's per-op loop needs 50-75 GB and ~45 s per op at 3B width, so a model above
    ``whole_max_params`` is compared on a carved copy (``model.carve``): the first
    ``carve_layers`` decoder layers and ``carve_vision_blocks`` vision blocks, real weights.
    """

    BLOCK: ClassVar[str] = "crosscheck"
    whole_max_params: int = 500_000_000  # up to this many parameters INC runs on the whole model
    carve_layers: int = 2  # above it: the first decoder layers kept in the carved copy
    carve_vision_blocks: int = 2  # and the first vision blocks

    def carves(self, params: int) -> bool:
        return params > self.whole_max_params


@dataclass(frozen=True)
class ReportParams(ParamsBlock):
    BLOCK: ClassVar[str] = "report"
    table_top: int | None = None  # rows per phase table; None = every op
    plot_top: int = 30  # ops in the spectrum plot and in the dvc-plots CSVs


@dataclass(frozen=True)
class CurveParams(ParamsBlock):
    """How keep-lists are measured on the eval split (stage ``curve``; ``validate`` reuses the baseline)."""

    BLOCK: ClassVar[str] = "curve"
    metric: str = "kl"  # the headline metric: orders the measured ranking, drawn in the plots
    # curve sizes per ranking: "auto" (every n up to validation.curve.DENSE_MAX scored ops, else
    # log-spaced), None (every n from 0 to all scored ops) or at most this many, log-spaced
    max_points: int | str | None = "auto"
    # ops measured alone for the measured ranking: "auto" (every op up to DENSE_MAX, else the top
    # DENSE_MAX of the fallback and of the requant ranking), "all", or the top K of each
    single_op: int | str = "auto"
    # shares of the all-int8 damage given back whose smallest n is bisected on every ranking (headline
    # metric) where the grid is log-spaced: what the report and a measured_budget policy read
    crossings: tuple[float, ...] = (0.5, 0.9, 0.99)
    random_lists: int = 5  # random keep-lists per size: the baseline a ranking must beat
    seed: int = 0
    batch_size: int = 8  # eval samples per forward


@dataclass(frozen=True)
class ValidateParams(ParamsBlock):
    BLOCK: ClassVar[str] = "validate"
    inc_check: bool = True  # also quantize with INC's own PTQ from the exported op_name_dict and compare


@dataclass(frozen=True)
class FallbackParams(ParamsBlock):
    BLOCK: ClassVar[str] = "fallback"
    phase: str
    policy: str
    settings: dict[str, Any]  # the chosen policy's own block
    always_keep: list[str] = field(default_factory=list)
    never_keep: list[str] = field(default_factory=list)
    onnx_model: Path = Path("data/onnx")  # an .onnx file, or a directory holding at most one
    fused_groups: bool = True  # keep or quantize a fused group (q/k/v, gate/up) whole


@dataclass(frozen=True)
class Params:
    captions: CaptionsParams
    model: ModelParams
    sensitivity: SensitivityParams
    schemes: SchemesParams
    crosscheck: CrosscheckParams
    curve: CurveParams
    fallback: FallbackParams
    validate: ValidateParams
    report: ReportParams


TINY_TEXT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
TINY_VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads")


def _captions(b: _Block) -> CaptionsParams:
    return CaptionsParams(
        annotations=Path(b.get("annotations", str)),
        images_dir=Path(b.get("images_dir", str)),
        count=b.int_in("count", 1),
        eval_count=b.int_in("eval_count", 1),
        seed=b.get("seed", int),
        captions_per_image=b.choice("captions_per_image", CAPTIONS_PER_IMAGE),
        max_side=b.int_in("max_side", 0),
        mode=b.choice("mode", CALIBRATION_MODES),
        params_file=b.source,
    )


def _sizes(b: _Block, keys: tuple[str, ...]) -> dict[str, int]:
    return {k: b.int_in(k, 1) for k in keys}


def _tiny(b: _Block) -> TinyModelParams:
    text = _sizes(b.block("text"), TINY_TEXT_KEYS)
    vision = _sizes(b.block("vision"), TINY_VISION_KEYS)
    where = f"{b.source}: {b.path}"
    if text["hidden_size"] % text["num_attention_heads"]:
        raise InputError(
            f"{where}.text.hidden_size: expected a multiple of num_attention_heads "
            f"({text['num_attention_heads']}), got {text['hidden_size']}"
        )
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise InputError(
            f"{where}.text.num_attention_heads: expected a multiple of num_key_value_heads "
            f"({text['num_key_value_heads']}), got {text['num_attention_heads']}"
        )
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    if head_dim % 4 or head_dim < 8:
        raise InputError(
            f"{where}.text: head size hidden_size/num_attention_heads must be a multiple of 4 "
            f"and >= 8 for the 3-axis rotary embedding, got {head_dim}"
        )
    if vision["hidden_size"] % vision["num_heads"] or (vision["hidden_size"] // vision["num_heads"]) % 4:
        raise InputError(
            f"{where}.vision.hidden_size: expected num_heads * a multiple of 4, "
            f"got {vision['hidden_size']} with num_heads {vision['num_heads']}"
        )
    return TinyModelParams(text=text, vision=vision, vocab_size=b.int_in("vocab_size", 300, 1_000_000))


MERGED_PATCH_PIXELS = 28 * 28  # the smallest image the processor can emit: one merged 2x2 patch of 14 px


def _model(b: _Block) -> ModelParams:
    if "hf_dir" in b.data:
        raise InputError(
            f"{b.where('hf_dir')}: replaced by model.input, the one path the source reads "
            "(the snapshot directory with source hf_dir; the calibration sample with tiny / full_size_random)"
        )
    proc = b.block("processor")
    bounds = {}
    for key in ("min_pixels", "max_pixels"):
        value = proc.get(key, (int, type(None)), None)
        if value is not None and value < MERGED_PATCH_PIXELS:
            raise InputError(
                f"{proc.where(key)}: expected null or >= {MERGED_PATCH_PIXELS} (one 28x28 merged patch), "
                f"got {value}"
            )
        bounds[key] = value
    min_px, max_px = bounds["min_pixels"], bounds["max_pixels"]
    if min_px is not None and max_px is not None and max_px < min_px:
        raise InputError(f"{proc.where('max_pixels')}: expected >= min_pixels ({min_px}), got {max_px}")
    return ModelParams(
        source=b.choice("source", MODEL_SOURCES),
        input=Path(b.get("input", str)),
        seed=b.get("seed", int),
        full_size=b.choice("full_size", FULL_SIZES, "3b"),
        tiny=_tiny(b.block("tiny")),
        min_pixels=min_px,
        max_pixels=max_px,
        params_file=b.source,
    )


def _op_dict(b: _Block, key: str) -> dict[str, Any]:
    value = b.get(key, (dict, type(None)), None) or {}
    for name, cfg in value.items():
        parts_ok = isinstance(cfg, dict) and bool(cfg) and set(cfg) <= {"weight", "activation"}
        if parts_ok:
            parts_ok = all(
                isinstance(part, dict)
                and (
                    "dtype" not in part
                    or (isinstance(part["dtype"], list) and all(isinstance(d, str) for d in part["dtype"]))
                )
                for part in cfg.values()
            )
        if not isinstance(name, str) or not parts_ok:
            raise InputError(
                f"{b.where(key)}.{name}: expected a mapping with 'weight' and/or 'activation' entries, each "
                f"a mapping like {{dtype: [fp32]}} (INC op-wise config), got {cfg!r}"
            )
        if key == "op_name_dict":
            try:
                re.compile(name)
            except re.error as e:
                raise InputError(
                    f"{b.where(key)}.{name}: expected a module name or a regular expression ({e})"
                ) from e
    return value


def _sensitivity(b: _Block) -> SensitivityParams:
    loss = b.get("tolerable_loss", (int, float))
    if not 0 < loss < 1:
        raise InputError(f"{b.where('tolerable_loss')}: expected a relative loss in (0, 1), got {loss!r}")
    return SensitivityParams(
        confidence_batches=b.int_in("confidence_batches", 1),
        batch_size=b.int_in("batch_size", 1),
        max_ops=b.int_in("max_ops", 1),
        tolerable_loss=float(loss),
        op_type_dict=_op_dict(b, "op_type_dict"),
        op_name_dict=_op_dict(b, "op_name_dict"),
        engine=b.choice("engine", ENGINES, SensitivityParams.engine),
        native=_native(b.block("native")),
        params_file=b.source,
    )


def _native(b: _Block) -> NativeParams:
    d = NativeParams
    reduce_range = b.get("reduce_range", (str, bool), d.reduce_range)
    if isinstance(reduce_range, bool):
        reduce_range = str(reduce_range).lower()
    if reduce_range not in ("auto", "true", "false"):
        raise InputError(f"{b.where('reduce_range')}: expected auto, true or false, got {reduce_range!r}")
    return NativeParams(
        device=b.choice("device", DEVICES, d.device),
        dtype=b.choice("dtype", DTYPES, d.dtype),
        arithmetic=b.choice("arithmetic", ARITHMETICS, d.arithmetic),
        reduce_range=reduce_range,
        requant_mode=b.choice("requant_mode", REQUANT_MODES, d.requant_mode),
        allow_tf32=b.get("allow_tf32", bool, d.allow_tf32),
        suffix_reuse=b.get("suffix_reuse", bool, d.suffix_reuse),
        processes=b.int_in("processes", 1, default=d.processes),
        scheme=b.choice("scheme", SCHEMES, d.scheme),
    )


def _schemes(b: _Block) -> SchemesParams:
    run = b.get("run", list, [])
    for i, name in enumerate(run):
        if name not in SCHEMES:
            raise InputError(f"{b.where('run')}[{i}]: expected one of {', '.join(SCHEMES)}, got {name!r}")
    if len(set(run)) != len(run):
        raise InputError(f"{b.where('run')}: lists a scheme twice ({run}); DVC would run one stage twice")
    return SchemesParams(
        run=tuple(run),
        arithmetic=b.choice("arithmetic", SCHEME_ARITHMETICS, SchemesParams.arithmetic),
        params_file=b.source,
    )


def _report(b: _Block) -> ReportParams:
    table_top = b.get("table_top", (int, type(None)), ReportParams.table_top)
    if table_top is not None and table_top < 1:
        raise InputError(
            f"{b.where('table_top')}: expected an integer >= 1 or null (all ops), got {table_top!r}"
        )
    return ReportParams(
        table_top=table_top,
        plot_top=b.int_in("plot_top", 1, default=ReportParams.plot_top),
        params_file=b.source,
    )


def _crosscheck(b: _Block) -> CrosscheckParams:
    d = CrosscheckParams
    return CrosscheckParams(
        whole_max_params=b.int_in("whole_max_params", 0, default=d.whole_max_params),
        carve_layers=b.int_in("carve_layers", 1, default=d.carve_layers),
        carve_vision_blocks=b.int_in("carve_vision_blocks", 1, default=d.carve_vision_blocks),
        params_file=b.source,
    )


def _curve(b: _Block) -> CurveParams:
    d = CurveParams
    max_points = b.get("max_points", (int, str, type(None)), d.max_points)
    if max_points != "auto" and max_points is not None and (isinstance(max_points, str) or max_points < 2):
        raise InputError(
            f"{b.where('max_points')}: expected auto, null (every size) or an integer >= 2, "
            f"got {max_points!r}"
        )
    single_op = b.get("single_op", (int, str), d.single_op)
    if single_op not in ("auto", "all") and (isinstance(single_op, str) or single_op < 1):
        raise InputError(
            f"{b.where('single_op')}: expected auto, all or an integer >= 1 (the top K of each ranking), "
            f"got {single_op!r}"
        )
    crossings = b.get("crossings", list, list(d.crossings))
    if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c <= 1 for c in crossings):
        raise InputError(
            f"{b.where('crossings')}: expected a list of shares in (0, 1] (0.9: 90 % of the all-int8 damage "
            f"given back), got {crossings!r}"
        )
    return CurveParams(
        metric=b.choice("metric", METRICS, d.metric),
        max_points=max_points,
        single_op=single_op,
        crossings=tuple(float(c) for c in crossings),
        random_lists=b.int_in("random_lists", 1, default=d.random_lists),
        seed=b.get("seed", int, d.seed),
        batch_size=b.int_in("batch_size", 1, default=d.batch_size),
        params_file=b.source,
    )


def _validate(b: _Block) -> ValidateParams:
    return ValidateParams(inc_check=b.get("inc_check", bool, ValidateParams.inc_check), params_file=b.source)


def _finite(b: _Block, key: str) -> float:
    value = b.get(key, (int, float))
    if not math.isfinite(value):
        raise InputError(f"{b.where(key)}: expected a finite number, got {value!r}")
    return float(value)


def _policy_settings(b: _Block, policy: str) -> dict[str, Any]:
    """Check the chosen policy's block; the other policies' blocks may hold anything."""
    if policy == "top_k":
        b.int_in("k", 1)
    elif policy == "top_fraction":
        if not 0 < _finite(b, "fraction") <= 1:
            raise InputError(
                f"{b.where('fraction')}: expected a fraction in (0, 1], got {b.data['fraction']!r}"
            )
    elif policy == "threshold":
        _finite(b, "value")
        b.get("relative", bool, False)
    elif policy == "error_budget":
        if not 0 < _finite(b, "percent") <= 100:
            raise InputError(
                f"{b.where('percent')}: expected a percentage in (0, 100], got {b.data['percent']!r}"
            )
    elif policy == "measured_budget":
        b.choice("metric", METRICS)
        b.choice("ranking", RANKINGS)
        if not 0 <= _finite(b, "percent") < 100:
            raise InputError(
                f"{b.where('percent')}: expected the damage left, in % of all-int8's, in [0, 100), "
                f"got {b.data['percent']!r}"
            )
    else:
        b.choice("metric", METRICS)
        budgets = [k for k in ("bits", "params_share") if k in b.data]
        if len(budgets) != 1:
            raise InputError(
                f"{b.where('bits')}: expected exactly one of bits or params_share, got {budgets}"
            )
        if budgets == ["bits"] and not 8 < _finite(b, "bits") <= 32:
            raise InputError(
                f"{b.where('bits')}: expected effective weight bits in (8, 32], got {b.data['bits']!r}"
            )
        if budgets == ["params_share"] and not 0 < _finite(b, "params_share") <= 1:
            raise InputError(
                f"{b.where('params_share')}: expected a share of weight params in (0, 1], "
                f"got {b.data['params_share']!r}"
            )
    return dict(b.data)


def _globs(b: _Block, key: str) -> list[str]:
    value = b.get(key, (list, type(None)), None) or []
    if not all(isinstance(v, str) for v in value):
        raise InputError(f"{b.where(key)}: expected a list of glob patterns, got {value!r}")
    return value


def _fallback(b: _Block) -> FallbackParams:
    policy = b.choice("policy", POLICIES)
    return FallbackParams(
        phase=b.choice("phase", SELECTABLE_PHASES),
        policy=policy,
        settings=_policy_settings(_Block(b.data.get(policy), f"{b.path}.{policy}", b.source), policy),
        always_keep=_globs(b, "always_keep"),
        never_keep=_globs(b, "never_keep"),
        onnx_model=Path(b.get("onnx_model", str, str(FallbackParams.onnx_model))),
        fused_groups=b.get("fused_groups", bool, FallbackParams.fused_groups),
        params_file=b.source,
    )


def parse_fallback(raw: Any, source: str = "params.yaml") -> FallbackParams:
    """The ``fallback`` block alone (a keep-list can be re-derived with other policies in a notebook)."""
    return _fallback(_Block(raw, "fallback", source))


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate every block of the params file; raise :class:`InputError` on the first problem.

    Every stage validates the whole file, so a typo in a later block stops the first stage that
    runs, before hours of work upstream of it.
    """
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as e:
        raise InputError(f"{source}: params file not found") from e
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with the blocks {', '.join(BLOCKS)}")
    return Params(
        captions=_captions(_Block(data.get("captions"), "captions", source)),
        model=_model(_Block(data.get("model"), "model", source)),
        sensitivity=_sensitivity(_Block(data.get("sensitivity"), "sensitivity", source)),
        schemes=_schemes(_Block(data.get("schemes", {}), "schemes", source)),
        crosscheck=_crosscheck(_Block(data.get("crosscheck", {}), "crosscheck", source)),
        curve=_curve(_Block(data.get("curve", {}), "curve", source)),
        fallback=_fallback(_Block(data.get("fallback"), "fallback", source)),
        validate=_validate(_Block(data.get("validate", {}), "validate", source)),
        report=_report(_Block(data.get("report", {}), "report", source)),
    )
