"""One block per DVC stage of ``params.yaml`` (captions, model, sensitivity, schemes, quantize,
crosscheck, report, curve, validate), each validated by pydantic from its annotations."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
    with_config,
)
from pydantic.dataclasses import dataclass
from typing_extensions import (
    TypedDict,
)

from ..phases import METRICS
from .base import (
    _CONFIG,
    ARITHMETICS,
    CALIBRATION_MODES,
    CAPTIONS_PER_IMAGE,
    CROSSCHECK_SCOPES,
    DEVICES,
    DTYPES,
    ENGINES,
    FULL_SIZES,
    INC_DTYPES,
    INC_OP_TYPES,
    MERGED_PATCH_PIXELS,
    MODEL_SOURCES,
    REQUANT_MODES,
    SCHEME_ARITHMETICS,
    SCHEMES,
    SCREENINGS,
    TORCH_SEED_MAX,
    TORCH_SEED_MIN,
    AsWritten,
    Expect,
    Int0,
    Int1,
    Number,
    ParamsBlock,
    _copy,
    _error,
    _or,
)


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
        "largest error they show is the estimate's bound, and they give the run's Spearman. The check "
        "after the selection draws as many fresh ops, at most 8.",
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
    scope: Literal[CROSSCHECK_SCOPES] = Field(
        default="auto",
        description="auto: the crosscheck compares INC with the native engine on the whole model up to "
        "whole_max_params, on the carved copy above; carved: on the carved copy at any size (a minute "
        "instead of two on the embedded default; every op kind is still in it).",
    )
    batches: Annotated[Int1 | None, Expect("an integer >= 1 or null (every confidence batch)")] = Field(
        default=None,
        description="The crosscheck compares the first this-many confidence batches (INC's loop costs a "
        "model copy per op per batch); null: every batch of the pass.",
    )

    def carves(self, params: int) -> bool:
        """Whether INC's PTQ (validate, target inc) must use the carved copy: the model is too big."""
        return params > self.whole_max_params

    def carves_crosscheck(self, params: int) -> bool:
        """Whether the crosscheck compares the engines on the carved copy."""
        return self.scope == "carved" or self.carves(params)

    def checked_batches(self, confidence_batches: int) -> int:
        return confidence_batches if self.batches is None else min(self.batches, confidence_batches)


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
    crossing_tolerance: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.0,
        description="Bisection of a crossing stops once it is bracketed within this fraction of the "
        "bracket's upper end (at least 1 op): 0 finds the smallest n exactly; 0.05 stops within 5 % of n "
        "and reports the upper end, a size that reaches the share (curve and validate; the bisections "
        "near fp32 are the dearest configurations at the 3B size).",
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
