"""Write stage outputs so that a failed or killed run never leaves a half-written artifact behind.

Everything is written into a temporary sibling and renamed into place only when complete; on
any exception, Ctrl-C or SIGTERM (``cli.run_stage`` turns SIGTERM and SIGHUP into an exception)
the temporary is removed and the previous output, if any, is untouched. A SIGKILL cannot be
caught: its leftover sibling carries the dead process's PID in its name and is removed the next
time anything is written to the same target. Files and directories get the permissions the
umask gives (temp-file helpers would make them 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_TAG = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers(target: Path) -> list[Path]:
    """Temporary siblings of ``target`` whose writing process is gone (killed runs)."""
    stale = []
    prefix = f".{target.name}{TMP_TAG}"
    if not target.parent.is_dir():
        return stale
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid = p.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.append(p)
    return stale


def remove_leftovers(target: Path) -> None:
    for p in leftovers(target):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _prefix(target: Path) -> str:
    return f".{target.name}{TMP_TAG}{os.getpid()}-"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    try:
        tmp.chmod(0o777 & ~_umask())
        yield tmp
        if target.exists():
            # Two renames, then the delete: the window without a complete output is two syscalls.
            old = target.parent / f"{_prefix(target)}old"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    fd, name = tempfile.mkstemp(prefix=_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~_umask())
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dump_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically, pretty and key-stable so diffs across commits stay small."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str, stage: str) -> Any:
    """Read a stage's JSON artifact back; a missing or broken file is one clear line naming it.

    ``what`` names the artifact and ``stage`` the stage that writes it ("sensitivity report",
    "sensitivity"): the message says which stage to run.
    """
    from .errors import InputError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: {what} missing (run the {stage} stage first)") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
