"""Apply a profile (``profiles/*.yaml``: a params overlay for a model size and a machine) to params.yaml.

Why an overlay written into params.yaml: DVC versions a run by the params file its stages read
(``dvc params diff``, ``dvc exp show``), so a profile is what ``dvc exp run -S`` would do with
many keys at once: the values land in ``params.yaml`` itself, in place, comments kept (ruamel.yaml
round-trip, DVC's own YAML library), and the result is validated as a whole before the file is
replaced. A profile sets only the keys it names; ``-S key=value`` pairs (YAML values) go
on top, e.g. the snapshot's path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_file
from ..errors import InputError
from ..params import load_params, load_yaml


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted keys and values; a mapping under a key whose name ends in ``_dict`` is one value
    (INC's op_name_dict / op_type_dict keys are regular expressions, not params)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not str(key).endswith("_dict"):
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def read_profile(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(f"{path}: profile not found (see profiles/)") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the profile ({e})") from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of params blocks, got {type(data).__name__}")
    return dict(_leaves(data))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key.path=value`` pairs, each value read as YAML (``500`` an int, ``[a, b]`` a list)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"-S {pair!r}: expected key.path=value")
        try:
            out[key.strip()] = load_yaml(value)
        except yaml.YAMLError as e:  # e.g. -S 'x={bad': one line naming the pair, not a traceback
            raise InputError(f"-S {pair!r}: the value is not valid YAML ({' '.join(str(e).split())})") from e
    return out


def _round_trip() -> Any:
    """ruamel.yaml in round-trip mode (DVC's own YAML writer): comments and layout kept; long
    flow mappings stay on one line; null written as ``null``."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return rt


def apply(params_path: Path, values: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Set ``values`` (dotted keys) in ``params_path``; returns (key, before, after) per change.

    A key must name an existing params block (a typo is an error naming it); the merged file
    must pass ``load_params``, or ``params_path`` is left as it was.
    """
    rt = _round_trip()
    data = rt.load(params_path.read_text())
    changes = []
    for key, value in values.items():
        node, parts = data, key.split(".")
        if parts[0] not in data:
            raise InputError(f"{key}: {parts[0]!r} is not a block of {params_path}")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"{key}: {part!r} is not a mapping in {params_path}")
        before = node.get(parts[-1])
        if before != value:
            node[parts[-1]] = value
            changes.append((key, before, value))
    with atomic_file(params_path) as tmp:
        with tmp.open("w") as fh:
            rt.dump(data, fh)
        try:
            load_params(tmp)
        except InputError as e:  # name the file the user gave, not the temporary
            detail = str(e).removeprefix(f"{tmp}: ")
            raise InputError(f"{params_path} (profile and -S applied): {detail}; left unchanged") from e
    return changes
