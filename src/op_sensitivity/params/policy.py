"""The ``fallback`` block: the keep-list policy and one typed settings block per policy."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
    with_config,
)
from pydantic.dataclasses import dataclass
from typing_extensions import (
    NotRequired,
    TypedDict,
)

from ..phases import METRICS, RANKINGS, SELECTABLE_PHASES
from .base import (
    _CONFIG,
    POLICIES,
    AsWritten,
    Expect,
    Globs,
    Int1,
    Number,
    ParamsBlock,
    _copy,
    _error,
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
