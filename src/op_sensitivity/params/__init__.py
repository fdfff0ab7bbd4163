"""Typed, validated view of ``params.yaml`` (one block per stage), as pydantic models.

Why: DVC hands stages raw YAML; a wrong type, an out-of-range value or a misspelt key should stop
a stage with a message naming ``params.yaml: block.field`` and what was expected, before any work
(a sensitivity pass can take hours), not as a traceback deep inside INC or transformers, and not
as a default silently used in place of the misspelt value.

Each block is a frozen pydantic dataclass (``dataclasses.replace`` and ``asdict`` work on it as on
any dataclass; ``replace`` validates the new values). The same models are the file's JSON Schema
(``params.schema.json``, written and checked by ``scripts/params_schema.py``, with the
``description`` of every field), so an editor running yaml-language-server completes and checks
params.yaml as it is typed (docs/params.md).

One module per concern; this package re-exports what the rest of the project imports:

- ``base``: the choices, field types, custom rule errors and ``ParamsBlock``;
- ``blocks``: one block per stage (captions ... validate) and the quantize targets' tables;
- ``policy``: the ``fallback`` block, one typed settings block per keep-list policy;
- ``wording``: pydantic's errors as one line in this project's words;
- ``file``: the YAML read, the whole file validated, the cross-block checks, the JSON Schema.
"""

from .base import INC_DTYPES, INC_OP_TYPES, SCHEMES, TORCH_SEED_MAX, TORCH_SEED_MIN
from .blocks import (
    FUSED_TARGETS,
    MAIN_PASS_TARGETS,
    TARGET_SCHEMES,
    TARGETS,
    CaptionsParams,
    CrosscheckParams,
    CurveParams,
    ModelParams,
    NativeParams,
    QuantizeParams,
    ReportParams,
    SchemesParams,
    SensitivityParams,
    TinyModelParams,
    ValidateParams,
)
from .file import (
    Params,
    ParamsFile,
    json_schema,
    load_params,
    load_yaml,
    parse_fallback,
    read_params_file,
    validate_params,
)
from .policy import FallbackParams

__all__ = [
    "FUSED_TARGETS",
    "INC_DTYPES",
    "INC_OP_TYPES",
    "MAIN_PASS_TARGETS",
    "SCHEMES",
    "TARGETS",
    "TARGET_SCHEMES",
    "TORCH_SEED_MAX",
    "TORCH_SEED_MIN",
    "CaptionsParams",
    "CrosscheckParams",
    "CurveParams",
    "FallbackParams",
    "ModelParams",
    "NativeParams",
    "Params",
    "ParamsFile",
    "QuantizeParams",
    "ReportParams",
    "SchemesParams",
    "SensitivityParams",
    "TinyModelParams",
    "ValidateParams",
    "json_schema",
    "load_params",
    "load_yaml",
    "parse_fallback",
    "read_params_file",
    "validate_params",
]
