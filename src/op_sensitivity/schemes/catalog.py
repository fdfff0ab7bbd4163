"""The schemes the pipeline runs, as a versioned file (``catalog.json``) written from the tools.

Why a file: a spectrum is a function of its inputs, and a scheme read live would change with
whichever tool version happens to be installed (or fail where the optional extra is not, and
``make repro`` needs none of them). ``python -m op_sensitivity.schemes.catalog`` rewrites the
file from the installed tools (``scripts/write_scheme_catalog.py``); tests/schemes checks it still
equals what they say, so a tool upgrade that changes its defaults fails the tests, not a run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..errors import InputError
from .spec import QuantSpec, Scheme

CATALOG = Path(__file__).with_name("catalog.json")


def to_dict(scheme: Scheme) -> dict[str, Any]:
    return asdict(scheme)


def with_version(scheme: Scheme) -> Scheme:
    """The scheme with its tool's installed version in ``source``: the catalog says what it was read from."""
    try:
        found = version(scheme.library)
    except PackageNotFoundError as exc:
        raise InputError(f"scheme {scheme.name}: {scheme.library} is not installed") from exc
    return replace(scheme, source=f"{scheme.source} ({scheme.library} {found})")


def from_dict(data: dict[str, Any], where: str) -> Scheme:
    """A scheme from its catalog entry, validated (QuantSpec checks its own fields)."""
    try:
        specs = {
            k: None if data[k] is None else QuantSpec(**data[k]) for k in ("weights", "inputs", "outputs")
        }
        lists = {k: tuple(data[k]) for k in ("op_types", "skip", "notes")}
        return Scheme(**{**data, **specs, **lists})
    except (KeyError, TypeError) as exc:
        raise InputError(f"{where}: not a scheme description ({exc})") from exc


def read(name: str, path: Path = CATALOG) -> Scheme:
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the scheme catalog ({exc})") from exc
    if name not in entries:
        raise InputError(f"{path}: no scheme {name!r}; it has {sorted(entries)}")
    return from_dict(entries[name], f"{path}: {name}")


def write(path: Path = CATALOG) -> dict[str, Any]:
    """Every scheme read from its installed tool, written as the catalog."""
    from . import DESCRIBE, describe

    entries = {name: to_dict(with_version(describe(name))) for name in DESCRIBE}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(entries, indent=2) + "\n")
    return entries
