"""Typed, validated view of ``params.yaml`` (one block per stage), as pydantic models.

Why: DVC hands stages raw YAML; a wrong type, an out-of-range value or a misspelt key should stop
a stage with a message naming ``params.yaml: block.field`` and what was expected, before any work
(a sensitivity pass can take hours), not as a traceback deep inside INC or transformers, and not
as a default silently used in place of the misspelt value.

Each block is a frozen pydantic dataclass (``dataclasses.replace`` and ``asdict`` work on it as on
any dataclass; ``replace`` validates the new values). The same models are the file's JSON Schema
(``params.schema.json``, written and checked by ``scripts/params_schema.py``, with the
``description`` of every field below), so an editor running yaml-language-server completes and
checks params.yaml as it is typed (docs/params.md).

How errors are produced: pydantic does every check from the annotations (strict types, so ``"8"``
or ``true`` is never an integer; ``Literal`` choices; ``Field`` bounds; ``extra="forbid"``; required
fields), and the few rules types cannot say (cross-field ones, INC's op-wise config, the legacy
``model.hf_dir``) raise a ``PydanticCustomError`` with their full wording. :func:`_input_error`
then turns the first error of the ``ValidationError`` into the one-line
:class:`~op_sensitivity.errors.InputError` ``"<params file>: <block>.<field>: expected ..., got
<value>"``, wording it from the error's type and the annotated type of the field it names (an
:class:`Expect` in that annotation gives a field its own wording).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import field
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    AfterValidator,
    AllowInfNan,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    model_validator,
    with_config,
)
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, SkipJsonSchema
from pydantic_core import PydanticCustomError
from typing_extensions import (
    NotRequired,
    Required,
    TypedDict,
    get_type_hints,
    is_typeddict,
)

from .errors import InputError
from .params_trace import trace_reads
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
SCREENINGS = ("none", "bfloat16", "tf32", "first_order")
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
    "quantize",
    "validate",
    "report",
)
SCHEME_ARITHMETICS = ("fake_quant", "kernels")
# The op types INC 2.x's PyTorch adaptor quantizes with static PTQ (the keys of the int8 'static'
# capabilities of neural_compressor/adaptor/pytorch_cpu.yaml for torch >= 1.11): what an
# op_type_dict key may name (tests/test_params.py reads the installed INC's file against it).
INC_OP_TYPES = (
    *("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Dropout"),
    *("Embedding", "EmbeddingBag", "InstanceNorm3d", "LayerNorm", "Linear", "QuantStub"),
)
# The dtypes an op-wise config may ask of it there: the int8 capabilities' (int8, uint8, fp32) and
# the bf16 precision. INC's own schema also takes weight-only dtypes (int4, nf4, fp4...), which a
# static pass ignores without a word.
INC_DTYPES = ("fp32", "bf16", "int8", "uint8")
OP_PARTS = ("weight", "activation")

TINY_TEXT_KEYS = (
    *("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"),
)
TINY_VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads")
MERGED_PATCH_PIXELS = 28 * 28  # the smallest image the processor can emit: one merged 2x2 patch of 14 px

# What torch.manual_seed takes (a wider seed overflows inside torch with a traceback)
TORCH_SEED_MIN, TORCH_SEED_MAX = -(2**63), 2**64 - 1

PARAMS_CONTEXT = "params_file"  # validation context key: the file every block remembers


# --- types ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Expect:
    """A field's own wording, in its annotation (pydantic ignores it; :func:`_input_error` reads it).

    ``what``: any error at or below the field reads "expected <what>, got <value>" (and "missing
    (expected <what>)"); ``keys``: an unknown key of this mapping reads "unknown key (expected <keys>)".
    """

    what: str = ""
    keys: str = ""


def _error(message: str, *at: str | int) -> PydanticCustomError:
    """A rule's own full message, about the keys ``at`` below where its validator runs."""
    return PydanticCustomError("params", "{message}", {"message": message, "at": at})


def _as_written(value: Any, handler: Any) -> Any:
    handler(value)  # checked against the annotated type...
    return value  # ...and kept as written: 50 stays 50 (not 50.0), keys keep their order


def _copy(cls: type, src: Any, **changes: Any) -> Any:
    """A ``cls`` with ``src``'s values of its fields, but ``changes``."""
    same = [f.name for f in dataclasses.fields(cls) if f.name not in changes]
    return cls(**{name: getattr(src, name) for name in same}, **changes)


def _or(empty: type) -> AfterValidator:
    return AfterValidator(lambda v: empty() if v is None else v)  # null reads as empty


AsWritten = WrapValidator(_as_written)
Int0 = Annotated[StrictInt, Field(ge=0)]
Int1 = Annotated[StrictInt, Field(ge=1)]
Number = Annotated[StrictFloat, AllowInfNan(False)]  # an int is a number, true is not
Globs = Annotated[list[StrictStr] | None, Expect("a list of glob patterns"), _or(list)]


# --- the blocks ----------------------------------------------------------------------------------------

_CONFIG = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default silently kept


@dataclass(frozen=True, config=_CONFIG)
class ParamsBlock:
    """One block of the params file; remembers the file so every later message can name it."""

    BLOCK: ClassVar[str] = ""
    params_file: SkipJsonSchema[str] = field(default="params.yaml", compare=False, kw_only=True)

    @model_validator(mode="before")
    @classmethod
    def _remember_file(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or PARAMS_CONTEXT not in (info.context or {}):
            return data  # built in Python (dataclasses.replace included)
        if "params_file" in data:
            raise PydanticCustomError("extra_forbidden", "unknown key", {"at": ("params_file",)})
        return {**data, "params_file": info.context[PARAMS_CONTEXT]}

    def where(self, name: str) -> str:
        """``"<params file>: <block>.<name>"``: how every message about a param starts."""
        return f"{self.params_file}: {self.BLOCK}.{name}"


@dataclass(frozen=True, config=_CONFIG)
class CaptionsParams(ParamsBlock):
    """Stage prepare_captions: where the COCO captions live and how the calibration sample is drawn."""

    BLOCK: ClassVar[str] = "captions"
    annotations: Path = Field(
        description="A COCO captions JSON (e.g. .../annotations/captions_train2017.json)."
    )
    images_dir: Path = Field(description="Its image folder (e.g. .../train2017).")
    count: Int1 = Field(description="Image+caption pairs drawn for calibration (data/calibration).")
    selection_count: Int1 = Field(
        description="Held-out pairs (data/selection: images neither calibration nor test uses) the curve "
        "stage and every measured keep-list policy measure on."
    )
    test_count: Int1 = Field(
        description="Held-out pairs (data/test: images neither calibration nor selection uses) only the "
        "validate stage measures on, to prove the chosen list."
    )
    seed: StrictInt = Field(description="Same seed + same file = same sample.")
    captions_per_image: Literal[CAPTIONS_PER_IMAGE] = Field(
        description="one (one caption per image) | all (every caption of each drawn image, up to count "
        "pairs)."
    )
    max_side: Int0 = Field(description="Resized copies with this longest side in pixels; 0 copies originals.")
    mode: Literal[CALIBRATION_MODES] = Field(
        description="image_caption (chat prompt with image + caption) | text_only (caption only: the vision "
        "tower is kept fp32 and not scored)."
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "eval_count" in data:
            raise _error(
                "replaced by selection_count and test_count, two disjoint held-out splits (selection: "
                "the curve stage and the measured keep-list policies; test: validate only)",
                "eval_count",
            )
        return data


@with_config(_CONFIG)
class TinyText(TypedDict):
    hidden_size: Annotated[Int1, Field(description="Width; a multiple of num_attention_heads.")]
    intermediate_size: Annotated[Int1, Field(description="MLP width.")]
    num_hidden_layers: Annotated[Int1, Field(description="Decoder layers.")]
    num_attention_heads: Annotated[
        Int1,
        Field(
            description="Heads; hidden_size / heads is a multiple of 4 and >= 8 (3-axis rotary embedding)."
        ),
    ]
    num_key_value_heads: Annotated[Int1, Field(description="KV heads; num_attention_heads is a multiple.")]


@with_config(_CONFIG)
class TinyVision(TypedDict):
    depth: Annotated[Int1, Field(description="Vision blocks.")]
    hidden_size: Annotated[Int1, Field(description="Width: num_heads x a multiple of 4.")]
    intermediate_size: Annotated[Int1, Field(description="MLP width.")]
    num_heads: Annotated[Int1, Field(description="Heads.")]


@dataclass(frozen=True, config=_CONFIG)
class TinyModelParams:
    """Reduced Qwen2.5-VL sizes for the embedded default (same architecture, seeded weights)."""

    text: TinyText = Field(description="Language model sizes (hidden/intermediate size, layers, heads).")
    vision: TinyVision = Field(description="Vision tower sizes (blocks, hidden/intermediate size, heads).")
    vocab_size: Annotated[StrictInt, Field(ge=300, le=1_000_000)] = Field(
        description="Byte-level BPE trained on the sample captions (upper bound)."
    )

    @model_validator(mode="after")
    def _heads(self) -> TinyModelParams:
        text = self.text
        hidden, heads, kv = text["hidden_size"], text["num_attention_heads"], text["num_key_value_heads"]
        if hidden % heads:
            raise _error(
                f"expected a multiple of num_attention_heads ({heads}), got {hidden}", "text", "hidden_size"
            )
        if heads % kv:
            raise _error(
                f"expected a multiple of num_key_value_heads ({kv}), got {heads}",
                "text",
                "num_attention_heads",
            )
        if (hidden // heads) % 4 or hidden // heads < 8:
            raise _error(
                "head size hidden_size/num_attention_heads must be a multiple of 4 "
                f"and >= 8 for the 3-axis rotary embedding, got {hidden // heads}",
                "text",
            )
        width, vheads = self.vision["hidden_size"], self.vision["num_heads"]
        if width % vheads or (width // vheads) % 4:
            raise _error(
                f"expected num_heads * a multiple of 4, got {width} with num_heads {vheads}",
                "vision",
                "hidden_size",
            )
        return self


Pixels = Annotated[
    Annotated[StrictInt, Field(ge=MERGED_PATCH_PIXELS)] | None,
    Expect(f"null or >= {MERGED_PATCH_PIXELS} (one 28x28 merged patch)"),
]


@dataclass(frozen=True, config=_CONFIG)
class ProcessorParams:
    """Image resizing bounds in pixels, so the number of image tokens; null keeps the snapshot's own."""

    min_pixels: Pixels = Field(default=None, description="Smallest image area (3136 = 56*56).")
    max_pixels: Pixels = Field(
        default=None, description="Largest image area (12544 = 112*112: 16 image tokens)."
    )

    @model_validator(mode="after")
    def _order(self) -> ProcessorParams:
        lo, hi = self.min_pixels, self.max_pixels
        if lo is not None and hi is not None and hi < lo:
            raise _error(f"expected >= min_pixels ({lo}), got {hi}", "max_pixels")
        return self


@dataclass(frozen=True, config=_CONFIG)
class ModelBlock(ParamsBlock):
    """Stage load_model: where the model comes from (the params file's shape of ModelParams)."""

    BLOCK: ClassVar[str] = "model"
    source: Literal[MODEL_SOURCES] = Field(
        description="tiny (embedded default, random weights) | hf_dir (local HF snapshot) | full_size_random "
        "(published 3B or 7B architecture, random weights)."
    )
    input: Path = Field(
        description="The one path the source reads (so the stage's one data dep): the calibration sample "
        "(tiny, full_size_random: their tokenizer is trained on its captions) or the snapshot dir (hf_dir)."
    )
    seed: Annotated[StrictInt, Field(ge=TORCH_SEED_MIN, le=TORCH_SEED_MAX)] = Field(
        description="tiny / full_size_random: weight init seed."
    )
    full_size: Literal[FULL_SIZES] = Field(
        default="3b", description="full_size_random: the published architecture to build, 3b | 7b."
    )
    tiny: TinyModelParams = Field(description="Sizes of the embedded default (source tiny).")
    processor: ProcessorParams = Field(
        default_factory=ProcessorParams,
        description="Image resizing bounds in pixels; null keeps the snapshot's own.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "hf_dir" in data:
            raise _error(
                "replaced by model.input, the one path the source reads (the snapshot directory with "
                "source hf_dir; the calibration sample with tiny / full_size_random)",
                "hf_dir",
            )
        return data

    def to_params(self) -> ModelParams:
        pixels = self.processor
        return _copy(ModelParams, self, min_pixels=pixels.min_pixels, max_pixels=pixels.max_pixels)


@dataclass(frozen=True, config=_CONFIG)
class ModelParams(ParamsBlock):
    """Where the model comes from. ``input`` is the one path the source reads, so the one DVC dep:
    the calibration sample for the random sources (their tokenizer is trained on its captions),
    the snapshot directory for ``hf_dir``. ``min_pixels`` / ``max_pixels`` are ``model.processor``'s."""

    BLOCK: ClassVar[str] = "model"
    source: Literal[MODEL_SOURCES]
    input: Path
    seed: StrictInt
    full_size: Literal[FULL_SIZES]  # with source full_size_random: 3b | 7b
    tiny: TinyModelParams
    min_pixels: Pixels
    max_pixels: Pixels


# INC's op-wise config (op_type_dict, op_name_dict) as INC's static PyTorch pass would use it:
# known op types, {weight|activation: {dtype: [...]}} with the dtypes it takes.
IncDtype = Annotated[
    Literal[INC_DTYPES],
    Expect(f"one of {', '.join(INC_DTYPES)} (the dtypes INC's static PyTorch pass takes op-wise)"),
]


@with_config(_CONFIG)
class OpPart(TypedDict, total=False):
    dtype: Annotated[
        list[IncDtype],
        Field(
            description="The dtypes INC may pick for it; [fp32] keeps it in high precision (both engines)."
        ),
    ]


# scheme, granularity, algorithm: INC would take them, the native engine not
_DTYPE_ONLY = Expect(keys="dtype: both engines read only the dtype of an op-wise config")


@with_config(ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1}))
class OpConfig(TypedDict, total=False):
    weight: Annotated[OpPart, _DTYPE_ONLY, Field(description="The op's weight.")]
    activation: Annotated[OpPart, _DTYPE_ONLY, Field(description="The op's input activation.")]


def _some_part(cfg: OpConfig) -> OpConfig:
    if not cfg:
        raise ValueError("no part")  # worded by the Expect below
    return cfg


def _regex(name: str) -> str:
    try:
        re.compile(name)
    except re.error as e:
        raise _error(f"expected a module name or a regular expression ({e})") from e
    return name


OpValue = Annotated[
    OpConfig,
    AfterValidator(_some_part),
    Expect(
        "a mapping with 'weight' and/or 'activation' entries, each a mapping like {dtype: [fp32]} "
        "(INC op-wise config)"
    ),
]
OpType = Annotated[
    Literal[INC_OP_TYPES],
    Expect(f"an op type INC's PyTorch adaptor quantizes (one of {', '.join(INC_OP_TYPES)})"),
]
OpDict = Annotated[dict[Annotated[StrictStr, AfterValidator(_regex)], OpValue] | None, AsWritten, _or(dict)]
OpTypeDict = Annotated[dict[OpType, OpValue] | None, AsWritten, _or(dict)]


@dataclass(frozen=True, config=_CONFIG)
class NativeParams:
    """The native engine's knobs (see ``engines.native``); the defaults are the ones params.yaml may omit.
    Used by engine native and by the crosscheck stage."""

    device: Literal[DEVICES] = Field(default="auto", description="auto | cpu | cuda.")
    dtype: Literal[DTYPES] = Field(
        default="float32",
        description="Compute dtype: float32 | bfloat16 | float16 (check anything but float32 against it "
        "first).",
    )
    arithmetic: Literal[ARITHMETICS] = Field(
        default="auto",
        description="auto (int8_kernels on cpu/float32 with scheme inc_cpu, else fake_quant) | int8_kernels "
        "(cpu, bit-exact with INC) | fp8_kernels (fp8 schemes) | fake_quant (any device).",
    )
    reduce_range: Annotated[
        Literal["auto", "true", "false"] | StrictBool,
        Expect("auto, true or false"),
        AfterValidator(lambda v: str(v).lower()),  # true -> "true"
    ] = Field(default="auto", description="auto (as INC decides from this CPU) | true | false.")
    requant_mode: Literal[REQUANT_MODES] = Field(
        default="cumulative",
        description="cumulative (INC's curve) | isolated (only this op int8: a true per-op measure).",
    )
    allow_tf32: StrictBool = Field(
        default=False, description="cuda: TF32 matmuls (check against float32 first)."
    )
    suffix_reuse: StrictBool = Field(
        default=True,
        description="A trial recomputes from the toggled op's block onward (values unchanged); false: every "
        "trial runs the whole model.",
    )
    processes: Int1 = Field(
        default=1,
        description="Shard the trials over N processes (N GPUs with device cuda); same values.",
    )
    scheme: Literal[SCHEMES] = Field(
        default="inc_cpu",
        description="The main pass's deployment scheme: inc_cpu (INC's; engine inc measures only this) | "
        "modelopt_int8 | modelopt_fp8 | llmcompressor_w8a8 | ort_qdq.",
    )
    trial_batch: Int1 = Field(
        default=8,
        description="Fallback trials of ops in the last trial_batch_layers decoder layers (and lm_head) run "
        "this many per forward, the trial as a batch dimension (values identical on CPU; 1: one each). "
        "Memory: the logits this many times over.",
    )
    trial_batch_layers: Annotated[StrictInt, Field(ge=0)] = Field(
        default=2, description="trial_batch: the last decoder layers whose fallback trials are batched."
    )
    screening: Literal[SCREENINGS] = Field(
        default="none",
        description="none | bfloat16 (autocast, cpu or cuda) | tf32 (cuda): run every trial in this fast "
        "precision, then re-measure in float32 each op that could stand in a phase's top exact_top (a "
        "derived bound, docs/engines.md); those values equal a float32 pass's. first_order: estimate every "
        "op from first_order_points forward+backward passes per batch, measure a seeded audit of audit ops "
        "exactly, then every op in contention for a top exact_top (docs/engines.md). Needs dtype float32.",
    )
    exact_top: Int1 = Field(
        default=32,
        description="screening: the top ops of each phase's ranking whose values and order are float32's "
        "(below them the order is the screen's).",
    )
    screening_margin: Annotated[Number, Field(gt=0), Expect("a positive number")] = Field(
        default=1.0,
        description="screening: a value's error bound as a multiple of the rounding error measured at the "
        "all-fp32 and all-int8 states; 1 is the triangle-inequality bound (docs/engines.md), below 1 "
        "trusts the error's projection to be smaller. Widened by the pass wherever a refined op shows it "
        "too narrow.",
    )
    audit: Int1 = Field(
        default=16,
        description="screening first_order: ops per phase drawn (seeded) and measured exactly first; the "
        "largest error they show is the estimate's bound, and they give the run's Spearman.",
    )
    exact_budget: Int1 | None = Field(
        default=None,
        description="screening: at most this many ops per phase measured in float32 for the selection "
        "(beyond first_order's audit and the check sample), those most likely in the top first; past it "
        "the top may not be float32's and the run names the ops left in contention "
        "(metadata.screening.budget). null: every op the selection needs. At least exact_top.",
    )
    first_order_points: Int1 = Field(
        default=4,
        description="screening first_order: forward+backward passes per batch, at evenly spaced points of "
        "INC's cumulative curve (the last: all int8, where fallback is expanded).",
    )
    first_order_probes: Annotated[StrictInt, Field(ge=0)] = Field(
        default=4,
        description="screening first_order: Hutchinson probes (one backward each) for fallback's second "
        "order term ||J delta||^2; 0 drops it.",
    )


@dataclass(frozen=True, config=_CONFIG)
class SensitivityParams(ParamsBlock):
    """Stage sensitivity: INC mse_v2 pass (fallback + requant phases), or the native engine."""

    BLOCK: ClassVar[str] = "sensitivity"
    confidence_batches: Int1 = Field(
        description="INC scores each op once per batch; each batch both calibrates and measures."
    )
    batch_size: Int1 = Field(description="Samples per confidence batch.")
    max_ops: Int1 = Field(
        description="Refuse to start a pass that would score more ops (INC costs seconds..minutes per op)."
    )
    tolerable_loss: Annotated[Number, Field(gt=0, lt=1), Expect("a relative loss in (0, 1)")] = Field(
        description="INC's accuracy criterion, in (0, 1); the pass is forced anyway."
    )
    op_type_dict: OpTypeDict = Field(
        default_factory=dict,
        json_schema_extra={"default": {}},
        description="INC op_type_dict: op type -> {weight: {dtype: [...]}, activation: {dtype: [...]}}, e.g. "
        "{Embedding: {weight: {dtype: [fp32]}, activation: {dtype: [fp32]}}} keeps every Embedding fp32.",
    )
    op_name_dict: OpDict = Field(
        default_factory=dict,
        json_schema_extra={"default": {}},
        description="INC op_name_dict: module name or regular expression -> the same value shape.",
    )
    engine: Literal[ENGINES] = Field(
        default="inc",
        description="inc (reference: INC's own loop) | native (same numbers in plain PyTorch, CPU or GPU).",
    )
    native: NativeParams = Field(default_factory=NativeParams, description="The native engine's knobs.")

    @model_validator(mode="after")
    def _budget_fits_the_top(self) -> SensitivityParams:
        n = self.native
        if n.exact_budget is not None and n.screening == "none":
            raise _error(
                "exact_budget caps a screened pass's float32 trials, and screening none measures every "
                "op in float32; set it to null or choose a screening",
                "native",
                "exact_budget",
            )
        if n.exact_budget is not None and n.exact_budget < n.exact_top:
            raise _error(
                f"exact_budget {n.exact_budget} cannot measure the top exact_top={n.exact_top} of a "
                f"phase; set it to at least {n.exact_top} (or null)",
                "native",
                "exact_budget",
            )
        return self

    @model_validator(mode="after")
    def _first_order_is_native(self) -> SensitivityParams:
        if self.engine == "inc" and self.native.screening == "first_order":
            raise _error(
                "first_order is the native engine's estimate, and engine inc measures every op with INC's "
                "own loop; set sensitivity.engine to native or screening to none",
                "native",
                "screening",
            )
        return self


def _one_stage_each(run: tuple[str, ...]) -> tuple[str, ...]:
    if not run:
        raise _error(
            "expected at least one scheme, got []: fallback_list and rank_report read reports/schemes/, "
            "which only the scheme_sensitivity stages write (one per scheme listed here)"
        )
    if len(set(run)) != len(run):
        raise _error(f"lists a scheme twice ({list(run)}); DVC would run one stage twice")
    return run


@dataclass(frozen=True, config=_CONFIG)
class SchemesParams(ParamsBlock):
    """Stage scheme_sensitivity: the native pass again under each listed deployment scheme, one cached
    stage each."""

    BLOCK: ClassVar[str] = "schemes"
    run: Annotated[
        tuple[Literal[SCHEMES], ...],
        Field(json_schema_extra={"minItems": 1, "uniqueItems": True}),  # checked by _one_stage_each
        AfterValidator(_one_stage_each),
    ] = Field(
        description="Deployment schemes, one cached DVC stage each (foreach), compared in the report; each "
        "tool's export is built from its own. At least one: fallback_list and rank_report read their outputs."
    )
    arithmetic: Literal[SCHEME_ARITHMETICS] = Field(
        default="fake_quant",
        description="fake_quant (the tools' own QDQ, to the bit) | kernels (int8: torch._int_mm, fp8: "
        "torch._scaled_mm, where the scheme is symmetric).",
    )


# target -> the scheme its keep-list is chosen on (inc: the main pass's list, fallback_ops.json)
TARGET_SCHEMES = {
    "compressed_tensors": "llmcompressor_w8a8",
    "ort_qdq": "ort_qdq",
    "modelopt_int8": "modelopt_int8",
    "modelopt_fp8": "modelopt_fp8",
    "inc": "inc_cpu",
}
MAIN_PASS_TARGETS = ("inc",)  # deployed from the main pass (sensitivity), not a scheme pass
FUSED_TARGETS = ("compressed_tensors", "modelopt_int8", "modelopt_fp8")  # runtimes that fuse q/k/v, gate/up
TARGETS = tuple(TARGET_SCHEMES)


def _unique_targets(targets: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(targets)) != len(targets):
        raise _error(f"lists a target twice ({list(targets)}); DVC would run one stage twice")
    return targets


@dataclass(frozen=True, config=_CONFIG)
class QuantizeParams(ParamsBlock):
    """Stage quantize: a deployable quantized model per target, written from the keep-list chosen on
    the target's own scheme spectrum and measured in the runtime that loads it."""

    BLOCK: ClassVar[str] = "quantize"
    targets: Annotated[
        tuple[Literal[TARGETS], ...],
        Field(json_schema_extra={"uniqueItems": True}),
        AfterValidator(_unique_targets),
    ] = Field(
        default=TARGETS,
        description="Deployment targets, one cached DVC stage each (foreach), each from the keep-list of "
        "its scheme (which schemes.run must measure): compressed_tensors (W8A8 checkpoint for vLLM and "
        "transformers, measured in transformers; llmcompressor_w8a8), ort_qdq (QDQ ONNX model from "
        "quantize_static, measured in ONNX Runtime; ort_qdq), modelopt_int8 / modelopt_fp8 (ModelOpt's "
        "unified HF checkpoint for vLLM / TensorRT-LLM, measured with ModelOpt's quantizers on its codes; "
        "modelopt_int8 / modelopt_fp8), inc (INC's "
        "PTQ model from the main pass's list, saved and reloaded by INC; sensitivity.native.scheme inc_cpu).",
    )


@dataclass(frozen=True, config=_CONFIG)
class CrosscheckParams(ParamsBlock):
    """Stage crosscheck and validate's INC PTQ check: INC against the native engine, on the real weights.

    INC's per-op loop needs 50-75 GB and ~45 s per op at 3B width, so a model above
    ``whole_max_params`` is compared on a carved copy (``model.carve``): the first
    ``carve_layers`` decoder layers and ``carve_vision_blocks`` vision blocks, real weights.
    """

    BLOCK: ClassVar[str] = "crosscheck"
    whole_max_params: Int0 = Field(
        default=500_000_000,
        description="Up to this many parameters INC runs on the whole model; above (the 3B and 7B), on a "
        "carved copy.",
    )
    carve_layers: Int1 = Field(
        default=2, description="Carved copy: the first decoder layers kept (real weights)."
    )
    carve_vision_blocks: Int1 = Field(default=2, description="Carved copy: the first vision blocks kept.")

    def carves(self, params: int) -> bool:
        return params > self.whole_max_params


@dataclass(frozen=True, config=_CONFIG)
class ReportParams(ParamsBlock):
    """Stage rank_report: markdown report, PNG plots, rank metrics."""

    BLOCK: ClassVar[str] = "report"
    table_top: Annotated[Int1 | None, Expect("an integer >= 1 or null (all ops)")] = Field(
        default=None, description="Rows per phase table in op_sensitivity.md; null = every op."
    )
    plot_top: Int1 = Field(
        default=30, description="Ops in the spectrum plot and in rank/top_<phase>.csv (dvc plots)."
    )


Share = Annotated[
    Number,
    Field(gt=0, le=1),
    Expect("a share in (0, 1] (0.9: 90 % of the all-int8 damage given back)"),
]


@dataclass(frozen=True, config=_CONFIG)
class CurveParams(ParamsBlock):
    """Stage curve: each ranking's top-n keep-lists measured on the held-out selection split (``validate``
    measures the same rankings and random lists again on the test split, with the same settings)."""

    BLOCK: ClassVar[str] = "curve"
    metric: Literal[METRICS] = Field(
        default="kl",
        description="Headline metric (kl | top1 | nll | logit_se): orders the measured ranking, drawn in "
        "plots.",
    )
    max_points: Annotated[
        Literal["auto"] | Annotated[StrictInt, Field(ge=2)] | None,
        Expect("auto, null (every size) or an integer >= 2"),
    ] = Field(
        default="auto",
        description="Sizes n per ranking: auto (every n up to 32 scored ops, else log-spaced, bisected "
        "where a policy or the report reads), null (every n) or an integer (at most that many).",
    )
    single_op: Annotated[
        Literal["auto", "all"] | Int1,
        Expect("auto, all or an integer >= 1 (the top K of each ranking)"),
    ] = Field(
        default="auto",
        description="Ops measured alone, for the measured ranking: auto (all up to 32, else the top 32 of "
        "the fallback and of the requant ranking), all, or an integer K (the top K of each).",
    )
    crossings: tuple[Share, ...] = Field(
        default=(0.5, 0.9, 0.99),
        description="Shares of the all-int8 damage given back: the smallest n reaching each is bisected on "
        "every ranking where the grid is log-spaced (the report and measured_budget read them; validate "
        "finds them again on the test split).",
    )
    random_lists: Int1 = Field(
        default=5, description="Random keep-lists per size: the baseline a ranking must beat (seeded)."
    )
    seed: StrictInt = Field(default=0, description="Seed of the random keep-lists.")
    batch_size: Int1 = Field(default=8, description="Held-out samples per forward (curve and validate).")


@dataclass(frozen=True, config=_CONFIG)
class ValidateParams(ParamsBlock):
    """Stage validate: the chosen keep-list on the test split, against random lists of its size."""

    BLOCK: ClassVar[str] = "validate"
    inc_check: StrictBool = Field(
        default=True,
        description="Also quantize with INC's own PTQ from the exported op_name_dict, and compare.",
    )


# --- fallback: one typed settings block per policy --------------------------------------------------


@with_config(_CONFIG)
class TopK(TypedDict):
    """top_k: the k most sensitive ops."""

    k: Annotated[Int1, Field(description="How many ops to keep.")]


@with_config(_CONFIG)
class TopFraction(TypedDict):
    """top_fraction: the top ceil(fraction x N) ops."""

    fraction: Annotated[
        Number,
        Field(gt=0, le=1, description="Share of the scored ops, in (0, 1]."),
        Expect("a fraction in (0, 1]"),
    ]


@with_config(_CONFIG)
class Threshold(TypedDict):
    """threshold: ops with score > value (x the max score when relative)."""

    value: Annotated[Number, Field(description="The score threshold."), Expect("a finite number")]
    relative: NotRequired[
        Annotated[StrictBool, Field(description="value is x the max score (default false).")]
    ]


@with_config(_CONFIG)
class ErrorBudget(TypedDict):
    """error_budget: the fewest top ops holding >= percent % of the summed single-op scores."""

    percent: Annotated[
        Number,
        Field(gt=0, le=100, description="Percentage, in (0, 100]."),
        Expect("a percentage in (0, 100]"),
    ]


@with_config(_CONFIG)
class MeasuredBudget(TypedDict):
    """measured_budget: the fewest top ops of the ranking whose measured damage on the selection split is
    <= percent % of all-int8's."""

    metric: Annotated[Literal[METRICS], Field(description="The metric the damage is measured by.")]
    percent: Annotated[
        Number,
        Field(ge=0, lt=100, description="Damage left, in % of all-int8's, in [0, 100)."),
        Expect("the damage left, in % of all-int8's, in [0, 100)"),
    ]
    ranking: Annotated[
        Literal[(*RANKINGS, "auto")],
        Field(
            description="The ranking whose top ops are walked: fallback | requant | measured, or auto (the "
            "one whose curve reaches the budget with the fewest ops on the selection split)."
        ),
    ]


@with_config(
    ConfigDict(
        extra="forbid", json_schema_extra={"oneOf": [{"required": ["bits"]}, {"required": ["params_share"]}]}
    )
)
class BitsBudget(TypedDict):
    """bits_budget: most measured gain within an effective-weight-bits (or params_share) budget."""

    metric: Annotated[Literal[METRICS], Field(description="The metric the gain is measured by.")]
    bits: NotRequired[
        Annotated[
            Number,
            Field(gt=8, le=32, description="Effective weight bits, in (8, 32]."),
            Expect("effective weight bits in (8, 32]"),
        ]
    ]
    params_share: NotRequired[
        Annotated[
            Number,
            Field(gt=0, le=1, description="Share of the weight params kept, in (0, 1]."),
            Expect("a share of weight params in (0, 1]"),
        ]
    ]


def _one_budget(block: BitsBudget | None) -> BitsBudget | None:
    budgets = [k for k in ("bits", "params_share") if k in (block or {})]
    if block is not None and len(budgets) != 1:
        raise _error(f"expected exactly one of bits or params_share, got {budgets}", "bits")
    return block


_POLICY_DOC = "Settings of policy {0} (checked whatever the policy; read when policy is {0})."


def _settings(policy: str) -> Any:
    return Field(default=None, description=_POLICY_DOC.format(policy))


@dataclass(frozen=True, config=_CONFIG)
class FallbackBlock(ParamsBlock):
    """Stage fallback_list: which ops to keep in high precision, and the per-tool exports (the params
    file's shape of FallbackParams: every policy's settings block)."""

    BLOCK: ClassVar[str] = "fallback"
    phase: Literal[SELECTABLE_PHASES] = Field(
        description="Ranking for top_k | top_fraction | threshold | error_budget: fallback | requant | both "
        "(combined by mean rank)."
    )
    policy: Literal[POLICIES] = Field(
        description="top_k | top_fraction | threshold | error_budget | measured_budget | bits_budget; each "
        "reads its own block below."
    )
    top_k: Annotated[TopK | None, AsWritten] = _settings("top_k")
    top_fraction: Annotated[TopFraction | None, AsWritten] = _settings("top_fraction")
    threshold: Annotated[Threshold | None, AsWritten] = _settings("threshold")
    error_budget: Annotated[ErrorBudget | None, AsWritten] = _settings("error_budget")
    measured_budget: Annotated[MeasuredBudget | None, AsWritten] = _settings("measured_budget")
    bits_budget: Annotated[BitsBudget | None, AsWritten, AfterValidator(_one_budget)] = _settings(
        "bits_budget"
    )
    fused_groups: StrictBool = Field(
        default=True,
        description="Keep or quantize q/k/v and gate/up groups whole (what vLLM / SGLang / TensorRT-LLM "
        "load).",
    )
    always_keep: Globs = Field(
        default_factory=list,
        json_schema_extra={"default": []},
        description="fnmatch globs on module names, added whatever the policy says.",
    )
    never_keep: Globs = Field(
        default_factory=list,
        json_schema_extra={"default": []},
        description="Globs removed from the list (wins over always_keep).",
    )
    onnx_model: Path = Field(
        default=Path("data/onnx"),
        description="An exported .onnx (or a directory holding at most one): real ONNX Runtime node names.",
    )

    @model_validator(mode="after")
    def _chosen(self) -> FallbackBlock:
        if getattr(self, self.policy) is None:
            raise _error(f"missing (expected a mapping: the settings of policy {self.policy})", self.policy)
        return self

    def to_params(self) -> FallbackParams:
        return _copy(FallbackParams, self, settings=dict(getattr(self, self.policy)))


@dataclass(frozen=True, config=_CONFIG)
class FallbackParams(ParamsBlock):
    BLOCK: ClassVar[str] = "fallback"
    phase: Literal[SELECTABLE_PHASES]
    policy: Literal[POLICIES]
    settings: dict[str, Any]  # the chosen policy's own block
    always_keep: Globs = field(default_factory=list)
    never_keep: Globs = field(default_factory=list)
    onnx_model: Path = Path("data/onnx")  # an .onnx file, or a directory holding at most one
    fused_groups: StrictBool = True  # keep or quantize a fused group (q/k/v, gate/up) whole


@dataclass(frozen=True, config=_CONFIG)
class Params:
    captions: CaptionsParams
    model: ModelParams
    sensitivity: SensitivityParams
    schemes: SchemesParams
    crosscheck: CrosscheckParams
    curve: CurveParams
    fallback: FallbackParams
    quantize: QuantizeParams
    validate: ValidateParams
    report: ReportParams


@dataclass(frozen=True, config=_CONFIG)
class ParamsFile:
    """op-sensitivity's params.yaml: one block per DVC stage. DVC reruns a stage only when its block (or
    its code/data) changes; every stage validates the whole file first.

    Every block is required, though each field of some has a default: dvc.yaml names each block as
    a stage's params, and DVC refuses a missing one ("Parameters 'report' are missing") only when it
    reaches that stage, after it ran and replaced the stages before it. Required here, a missing
    block stops check_params, the DAG's first stage, instead."""

    captions: CaptionsParams = Field(
        description="Stage prepare_captions: COCO captions -> calibration sample."
    )
    model: ModelBlock = Field(description="Stage load_model: a loadable HF directory + op inventory.")
    sensitivity: SensitivityParams = Field(
        description="Stage sensitivity: INC mse_v2 pass (fallback + requant phases), or the native engine."
    )
    schemes: SchemesParams = Field(
        description="Stage scheme_sensitivity: the native pass again under each deployment scheme."
    )
    crosscheck: CrosscheckParams = Field(
        description="Stage crosscheck and validate's INC PTQ check: INC against the native engine.",
    )
    curve: CurveParams = Field(
        description="Stage curve: each ranking's top-n keep-lists measured on the held-out selection split.",
    )
    fallback: FallbackBlock = Field(
        description="Stage fallback_list: which ops to keep in high precision, and the per-tool exports."
    )
    quantize: QuantizeParams = Field(
        description="Stage quantize: a deployable quantized model per target, measured in its runtime.",
    )
    validate: ValidateParams = Field(
        description="Stage validate: the chosen keep-list on the test split, against random lists of its "
        "size, and the ops each ranking needs there.",
    )
    report: ReportParams = Field(
        description="Stage rank_report: markdown report, PNG plots, rank metrics.",
    )

    @model_validator(mode="before")
    @classmethod
    def _optional_blocks(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        # an omitted optional block is validated too, so its defaults remember the params file
        optional = [k for k, f in cls.__pydantic_fields__.items() if not f.is_required()]
        return {**dict.fromkeys(optional, {}), **data}

    def to_params(self) -> Params:
        return _copy(Params, self, model=self.model.to_params(), fallback=self.fallback.to_params())


# --- pydantic's errors in this project's words -------------------------------------------------------------

_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")
_NOT_A_MAPPING = ("dict_type", "dataclass_type", "model_type")
_TYPE_ERRORS = {  # what a value of the wrong type should have been, whatever the field's bounds
    **{"int_type": "an integer", "bool_type": "true/false", "float_type": "a number"},
    **{"string_type": "a string", "path_type": "a string", "list_type": "a list", "tuple_type": "a list"},
    "finite_number": "a finite number",
}


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """``tp`` without Annotated, NotRequired and a None option, and the metadata they carried."""
    meta: tuple[Any, ...] = ()
    while True:
        origin, args = get_origin(tp), get_args(tp)
        if origin is Annotated:
            tp = args[0]
            for m in args[1:]:
                meta += tuple(m.metadata) if isinstance(m, FieldInfo) else (m,)
        elif origin in (NotRequired, Required):
            tp = args[0]
        elif origin in (Union, UnionType) and len(options := [a for a in args if a is not NoneType]) == 1:
            tp = options[0]  # X | None: X
        else:
            return tp, meta


def _keys(tp: Any) -> dict[str, Any]:
    """The keys the mapping type ``tp`` takes in the params file, with their annotated types."""
    if is_typeddict(tp):
        return get_type_hints(tp, include_extras=True)
    if dataclasses.is_dataclass(tp):
        fields = tp.__pydantic_fields__.items()
        return {name: f.rebuild_annotation() for name, f in fields if name != "params_file"}
    return {}


def _walk(root: type, loc: tuple[str | int, ...]) -> list[tuple[Any, tuple[Any, ...]]]:
    """(type, metadata) below ``root`` at each step of an error's ``loc``, as far as the types name it."""
    steps = [_unwrap(root)]
    for i, part in enumerate(loc):
        tp = steps[-1][0]
        origin, args, keys = get_origin(tp), get_args(tp), _keys(tp)
        if origin is dict:  # an error of the key itself is at (..., key, "[key]")
            tp = args[0] if loc[i + 1 : i + 2] == ("[key]",) else args[1]
        elif origin in (list, tuple) and isinstance(part, int):
            tp = args[0]
        elif part in keys:
            tp = keys[part]
        else:
            break
        steps.append(_unwrap(tp))
    return steps


def _own(meta: tuple[Any, ...], attr: str) -> str:
    return next((getattr(m, attr) for m in meta if isinstance(m, Expect) and getattr(m, attr)), "")


def _expected(tp: Any, meta: tuple[Any, ...]) -> str:
    """What a value of this annotated type is, in words."""
    if get_origin(tp) is Literal:
        return f"one of {', '.join(map(str, get_args(tp)))}"
    if tp is int:
        lo = next((m.ge for m in meta if isinstance(m, annotated_types.Ge)), None)
        hi = next((m.le for m in meta if isinstance(m, annotated_types.Le)), None)
        return "an integer" + ("" if lo is None else f" >= {lo}" if hi is None else f" in [{lo}, {hi}]")
    words = {bool: "true/false", float: "a number", str: "a string", Path: "a string (a path)"}
    return "a list" if get_origin(tp) in (list, tuple) else words.get(tp, "a mapping")


def _input_error(e: ValidationError, root: type, source: str, prefix: tuple[str, ...] = ()) -> InputError:
    """The first problem in one line, ``<source>: <block>.<field>: expected ..., got <value>`` (an unknown
    key before any other: a misspelt key explains a missing one)."""
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] in _UNKNOWN_KEY), errors[0])
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    loc = (*err["loc"], *ctx.get("at", ()))  # a rule's message may name keys below its validator
    steps = _walk(root, loc)  # steps[i]: the annotated type at loc[:i]
    worded = [i for i, (_, meta) in enumerate(steps) if _own(meta, "what")]
    if worded and kind not in ("params", *_UNKNOWN_KEY):
        loc = loc[: worded[-1]]  # the deepest field with its own wording speaks for every error below it
    tp, meta = steps[min(len(loc), len(steps) - 1)]
    what = _own(meta, "what") or _TYPE_ERRORS.get(kind) or _expected(tp, meta)
    if kind == "params":
        text = ctx["message"]
    elif kind in _UNKNOWN_KEY:
        tp, meta = steps[min(len(loc), len(steps)) - 1]  # the mapping holding the key
        text = f"unknown key (expected {_own(meta, 'keys') or 'one of ' + ', '.join(_keys(tp))})"
    elif len(steps) <= len(loc):  # a type the walk does not know (none should be left)
        text = f"{err['msg']}, got {got!r}"
    elif kind == "missing":
        block = isinstance(tp, type) and issubclass(tp, ParamsBlock)
        text = "expected a mapping (the block is missing)" if block else f"missing (expected {what})"
    elif kind in _NOT_A_MAPPING and not _own(meta, "what"):
        text = f"expected a mapping, got {'null' if got is None else type(got).__name__}"
    else:
        text = f"expected {what}, got {got!r}"
    path = ""
    for part in (*prefix, *loc):
        if part != "[key]":
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return InputError(f"{source}: {path}: {text}" if path else f"{source}: {text}")


# --- reading the file, and its JSON Schema ---------------------------------------------------------------


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def _validate(cls: type, data: Any, source: str, prefix: tuple[str, ...] = ()) -> Any:
    try:
        return _adapter(cls).validate_python(data, context={PARAMS_CONTEXT: source})
    except ValidationError as e:
        raise _input_error(e, cls, source, prefix) from None


def parse_fallback(raw: Any, source: str = "params.yaml") -> FallbackParams:
    """The ``fallback`` block alone (a keep-list can be re-derived with other policies in a notebook)."""
    return _validate(FallbackBlock, raw, source, ("fallback",)).to_params()


class DuplicateKeyError(yaml.YAMLError):
    """A mapping key written twice in one YAML mapping."""

    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"line {again}: key {key!r} written twice (first at line {first})")
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping.

    Why: PyYAML (and DVC) keep the last of two equal keys without a word, so a second ``curve:``
    block pasted at the end of params.yaml silently replaces every value of the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise DuplicateKeyError(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`_UniqueKeyLoader`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def read_params_file(path: str | os.PathLike) -> Any:
    """The params file's YAML, or :class:`InputError` saying why it cannot be read (missing, a
    directory, unreadable, not UTF-8, not YAML, a key written twice)."""
    source = str(path)
    try:
        data = load_yaml(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(f"{source}: params file not found") from e
    except IsADirectoryError as e:
        raise InputError(f"{source}: is a directory, expected the params YAML file") from e
    except UnicodeDecodeError as e:
        raise InputError(f"{source}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except OSError as e:
        raise InputError(f"{source}: cannot read the params file ({e.strerror or e})") from e
    except DuplicateKeyError as e:
        raise InputError(
            f"{source}: {e}; YAML keeps only the last, so the first one's values would be dropped "
            "without a word: merge them"
        ) from e
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with the blocks {', '.join(BLOCKS)}")
    return data


def validate_params(data: Any, source: str = "params.yaml") -> Params:
    """Validate the params file's content (a mapping of blocks); :class:`InputError` on the first problem."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping with the blocks {', '.join(BLOCKS)}")
    params = _validate(ParamsFile, data, source).to_params()
    _check_targets(params, source)
    return params


def _check_targets(p: Params, source: str) -> None:
    """A quantize target is written from its scheme's keep-list: that scheme must be measured."""
    for target in p.quantize.targets:
        if target in FUSED_TARGETS and not p.fallback.fused_groups:
            raise InputError(
                f"{source}: quantize.targets: {target} is served with q/k/v and gate/up fused (vLLM, "
                "TensorRT-LLM), but fallback.fused_groups: false lets a keep-list split them; set it true "
                "or drop the target"
            )
        scheme = TARGET_SCHEMES[target]
        if target in MAIN_PASS_TARGETS:
            if p.sensitivity.native.scheme != scheme:
                raise InputError(
                    f"{source}: quantize.targets: {target} deploys the main pass's keep-list, which is "
                    f"chosen under sensitivity.native.scheme {p.sensitivity.native.scheme}, not {scheme}; "
                    f"set it to {scheme} or drop the target"
                )
        elif scheme not in p.schemes.run:
            raise InputError(
                f"{source}: quantize.targets: {target} is written from the {scheme} keep-list, but "
                f"schemes.run ({', '.join(p.schemes.run)}) does not measure {scheme}; add it there"
            )


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate every block of the params file; raise :class:`InputError` on the first problem.

    Every stage validates the whole file, so a typo in a later block stops the first stage that
    runs, before hours of work upstream of it.
    """
    return trace_reads(validate_params(read_params_file(path), str(path)))


class _Schema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Max Points" above "max_points" tells an editor's user nothing


def json_schema() -> dict[str, Any]:
    """The JSON Schema of params.yaml (what ``params.schema.json`` holds), from the models above."""
    schema = _adapter(ParamsFile).json_schema(schema_generator=_Schema)
    schema["title"] = "params.yaml"
    return {"$schema": _Schema.schema_dialect, **schema}
