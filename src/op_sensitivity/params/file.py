"""The whole params file: reading the YAML (a key given twice is an error), validating every block,
the cross-block checks, and the JSON Schema editors read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    Field,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import GenerateJsonSchema

from ..errors import InputError
from ..params_trace import trace_reads
from .base import (
    _CONFIG,
    BLOCKS,
    _copy,
)
from .blocks import (
    FUSED_TARGETS,
    MAIN_PASS_TARGETS,
    TARGET_SCHEMES,
    CaptionsParams,
    CrosscheckParams,
    CurveParams,
    ModelBlock,
    ModelParams,
    QuantizeParams,
    ReportParams,
    SchemesParams,
    SensitivityParams,
    ValidateParams,
)
from .policy import (
    FallbackBlock,
    FallbackParams,
)
from .wording import (
    _adapter,
    _validate,
)


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
