"""The params models' shared vocabulary: choices, field types, custom rule errors, and the block
every stage block derives from (it remembers the params file so every message can name it)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    AllowInfNan,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    WrapValidator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

CALIBRATION_MODES = ("image_caption", "text_only")
CAPTIONS_PER_IMAGE = ("one", "all")
MODEL_SOURCES = ("tiny", "hf_dir", "full_size_random")
FULL_SIZES = ("3b", "7b")  # published architectures full_size_random builds
DTYPES = ("float32", "bfloat16", "float16")
ENGINES = ("inc", "native")
CROSSCHECK_SCOPES = ("auto", "carved")
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
