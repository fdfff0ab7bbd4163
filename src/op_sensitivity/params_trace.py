"""Which params fields a stage's code reads: recorded through the params models themselves.

Why: DVC reruns a stage only for the params ``dvc.yaml`` lists under it; a field the code reads
but the list leaves out makes a stale artifact look current (the scheme spectra once ignored
``sensitivity.native.screening``). Hand-kept lists drift, so the test suite runs the DAG with
``OP_SENSITIVITY_TRACE_PARAMS`` set to a directory and checks every field each stage read against
its ``params:`` in ``dvc.yaml`` (tests/test_params_deps.py).

How: the blocks are frozen dataclasses; while tracing, each block class's ``__getattribute__``
records ``block.field`` when a field of an instance loaded from the file is read (``asdict`` and
``dataclasses.replace`` read every field, and so count them all). Only leaves are recorded: reading
``params.sensitivity`` alone reads no value. At exit the process writes one JSON file into the
directory: its script, its arguments and the sorted dotted names. Unset, nothing is patched.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

ENV = "OP_SENSITIVITY_TRACE_PARAMS"

T = TypeVar("T")


_OWNERS: dict[int, tuple[Any, str]] = {}  # id(instance) -> (instance, dotted prefix), every load
_READS: set[str] = set()
_PATCHED: set[type] = set()


def _walk(obj: Any, prefix: str) -> None:
    """Remember every dataclass of a loaded params tree (kept alive, so an id is never reused)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _OWNERS[id(obj)] = (obj, prefix)
        for f in dataclasses.fields(obj):
            _walk(object.__getattribute__(obj, f.name), f"{prefix}.{f.name}".lstrip("."))


def _patch(cls: type) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    original = cls.__getattribute__

    def getattribute(self: Any, name: str) -> Any:
        value = original(self, name)
        owner = _OWNERS.get(id(self))
        if name in names and owner is not None and owner[0] is self and id(value) not in _OWNERS:
            _READS.add(f"{owner[1]}.{name}".lstrip("."))
        return value

    cls.__getattribute__ = getattribute  # type: ignore[method-assign]
    _PATCHED.add(cls)


def _dump(directory: str) -> None:
    out = Path(directory) / f"{Path(sys.argv[0]).stem}-{os.getpid()}.json"
    record = {"script": Path(sys.argv[0]).name, "argv": sys.argv[1:], "reads": sorted(_READS)}
    out.write_text(json.dumps(record, indent=1) + "\n")


def trace_reads(params: T) -> T:
    """``params`` as loaded; with ``OP_SENSITIVITY_TRACE_PARAMS`` set, its field reads are recorded
    (every load of the process into one file, written at exit)."""
    directory = os.environ.get(ENV)
    if not directory:
        return params
    if not _PATCHED:
        atexit.register(_dump, directory)
    _walk(params, "")
    for cls in {type(obj) for obj, _ in _OWNERS.values()} - _PATCHED:
        _patch(cls)
    return params
