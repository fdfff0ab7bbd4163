"""pydantic's errors in this project's words: the first error of a ``ValidationError`` as one
:class:`~op_sensitivity.errors.InputError` line,
``"<params file>: <block>.<field>: expected ..., got <value>"``.

How: pydantic does every check from the annotations (strict types, ``Literal`` choices, ``Field``
bounds, ``extra="forbid"``, required fields); the few rules types cannot say raise a
``PydanticCustomError`` with their full wording (``base._error``). :func:`_input_error` words the
rest from the error's type and the annotated type of the field it names (an ``Expect`` in that
annotation gives a field its own wording)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import (
    TypeAdapter,
    ValidationError,
)
from pydantic.fields import FieldInfo
from typing_extensions import (
    NotRequired,
    Required,
    get_type_hints,
    is_typeddict,
)

from ..errors import InputError
from .base import (
    PARAMS_CONTEXT,
    Expect,
    ParamsBlock,
)

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
