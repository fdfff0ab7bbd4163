"""Write stage outputs so that a failed or killed run never leaves a half-written artifact behind.

Everything is written into a temporary sibling and renamed into place only when complete; on
any exception, Ctrl-C or SIGTERM (``cli.run_stage`` turns SIGTERM and SIGHUP into an exception)
the temporary is removed and the previous output, if any, is untouched. A SIGKILL cannot be
caught: its leftover sibling carries the dead process's PID in its name and is removed the next
time anything is written to the same target. Files and directories get the permissions the
umask gives (temp-file helpers would make them 0600 / 0700).

A stage with several outputs that must change together (an artifact and the document that
measures it) builds them in :func:`staging` and renames them into place with :func:`commit`, which
holds SIGTERM / SIGHUP / SIGINT back for its few renames. Every path committed in this process is
recorded (:func:`committed`), so that ``cli.run_stage`` says truthfully what a stopped run wrote.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_TAG = ".tmp-"
HELD_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # held back while a set is renamed in

_COMMITTED: list[Path] = []  # every path this process renamed into place (cli.run_stage reads it)


def committed() -> list[Path]:
    """The outputs this process has renamed into place since :func:`forget_committed` (a path inside
    a temporary or staging directory is no output: it is not listed)."""
    return [p for p in _COMMITTED if not any(_is_temporary(part) for part in p.parent.parts)]


def _is_temporary(name: str) -> bool:
    """``name`` is one of this module's temporaries: ``.<target>.tmp-<pid>-<suffix>``."""
    head, tag, tail = name.partition(TMP_TAG)
    return name.startswith(".") and bool(tag) and bool(head[1:]) and tail.split("-", 1)[0].isdigit()


def forget_committed() -> None:
    _COMMITTED.clear()


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


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree, whichever ``path`` is (missing: nothing to do)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_leftovers(target: Path) -> None:
    for p in leftovers(target):
        _remove(p)


def _prefix(target: Path) -> str:
    return f".{target.name}{TMP_TAG}{os.getpid()}-"


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``, whatever ``target`` is now (nothing, a file, a directory).

    A file over a file is one ``rename(2)``. A directory cannot be renamed over a non-empty one (nor
    over a file): the old one is renamed aside first (the window without a complete output is two
    syscalls) and removed after, a file as much as a directory (``rmtree`` of a file fails, and
    silently with ``ignore_errors``: the old sibling stayed).
    """
    exists = target.exists() or target.is_symlink()
    if not exists or not (tmp.is_dir() or (target.is_dir() and not target.is_symlink())):
        os.replace(tmp, target)
    else:
        old = target.parent / f"{_prefix(target)}old"
        target.rename(old)
        tmp.rename(target)
        _remove(old)
    _COMMITTED.append(target)


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
        _swap_in(tmp, target)
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
        _COMMITTED.append(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike, kind: str) -> Path:
    """Fail now, naming the path, where writing ``path`` (``kind`` "file" or "dir") at the end of
    a long run would fail: its parent directories are made (a file in their way raises
    ``FileExistsError`` / ``NotADirectoryError`` naming it), and a directory where a file is to be
    written is refused (``IsADirectoryError``). A file where a directory goes is replaced."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "file" and target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "a directory is where this file is written", str(target))
    return target


@contextlib.contextmanager
def staging(path: str | os.PathLike) -> Iterator[Path]:
    """A private directory beside ``path`` to build outputs in, removed on exit whatever happens.

    Beside the output, not in ``$TMPDIR``: on the same filesystem, so :func:`commit` is a rename;
    inside the project, where a user looks; and named like :func:`atomic_dir`'s temporaries (the
    PID in the name), so what a ``kill -9`` leaves is removed the next time ``path`` is written.
    """
    target = check_writable(path, "dir")
    remove_leftovers(target)
    root = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    try:
        root.chmod(0o777 & ~_umask())
        yield root
    finally:
        _remove(root)


def commit(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each built path onto its target (``(built, target)``, in order), as one step.

    SIGTERM, SIGHUP and SIGINT are held back until the last rename is done: a stop asked for during
    the renames is delivered after them (``cli.run_stage`` then says the outputs were written),
    never between two. (Held by Python handlers that only note the signal, not by the thread's
    signal mask: the kernel may hand a process signal to any of torch's threads.) A SIGKILL cannot
    be held: between two renames (microseconds) it leaves the targets renamed so far new and the
    rest old, each target whole; the caller orders the pairs so that the one a user deploys comes
    last and describes itself.
    """
    for built, target in pairs:
        check_writable(target, "dir" if built.is_dir() else "file")
    with _held_signals():
        for built, target in pairs:
            remove_leftovers(target)
            _swap_in(built, target)


@contextlib.contextmanager
def _held_signals() -> Iterator[None]:
    """Note HELD_SIGNALS while the block runs; the first one noted is raised again after it, to the
    handler that was installed before (outside the main thread, where Python cannot install
    handlers, the block runs unguarded)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: noted.append(signum)) for s in HELD_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if noted:
            signal.raise_signal(noted[0])


@contextlib.contextmanager
def private_tmp(path: str | os.PathLike) -> Iterator[Path]:
    """Point ``$TMPDIR`` (for C libraries, read when they load) and Python's ``tempfile`` at
    ``path`` (made here) while the block runs, then back. Libraries write there without asking:
    ONNX Runtime's telemetry session file ``.ses`` at ``import onnxruntime``, torch's
    ``torchinductor_<user>`` cache when ``torch._dynamo`` is imported, ``quantize_static``'s
    ``ort.quant.*`` directories; a stage that points them into its own scratch leaves nothing in
    the system's temporary directory, even killed (the scratch is removed on its next run)."""
    tmp = Path(path)
    tmp.mkdir(parents=True, exist_ok=True)
    before_env, before_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(tmp.resolve())
    tempfile.tempdir = str(tmp.resolve())
    try:
        yield tmp
    finally:
        tempfile.tempdir = before_tempdir
        if before_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before_env


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
