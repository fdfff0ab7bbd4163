"""A stage stops when the ``dvc repro`` that started it dies.

Why: killing ``dvc repro`` (``kill`` or ``kill -9``; DVC sets no SIGTERM handler, so both end it
at once) does not end the stage command it runs: that process is re-parented and goes on for
hours, writing outputs no DVC will record, holding memory and GPUs, and racing the next
``dvc repro``. The stage must notice by itself.

How: DVC runs a stage's cmd as ``$SHELL -c "<cmd>"``. bash and zsh exec a single command, so
the stage's parent is DVC; other shells (dash as ``/bin/sh``) may stay between them, and then
the parent is a shell that outlives DVC. So :func:`stop_with_parent` watches the nearest
ancestor that is not a shell: Linux's ``PR_SET_PDEATHSIG`` turns the parent's death into
``signum`` at once, and a daemon thread polls the watched ancestor (pid and start time, so a
reused pid is not mistaken for it) for the shell case. The stage then gets SIGTERM, which
``cli.run_stage`` unwinds through the same cleanup as a ``kill`` of the stage itself: no
temporary output left, one line saying what happened, exit 143.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "busybox"})
POLL_SECONDS = 0.5


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(command name, parent pid, start time in clock ticks) from ``/proc/<pid>/stat``; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()  # from field 3 (state) on
    if fields[0] in ("Z", "X"):  # a zombie is dead: only its parent has not reaped it yet
        return None
    return name, int(fields[1]), int(fields[19])


def watched_ancestor(pid: int | None = None) -> tuple[int, int] | None:
    """(pid, start time) of the nearest ancestor of ``pid`` (default: this process) that is not a
    shell: the process whose death should end this one. None where ``/proc`` cannot tell."""
    here = _stat(pid if pid is not None else os.getpid())
    if here is None:
        return None
    ancestor = here[1]
    for _ in range(8):  # a few shells deep at most
        info = _stat(ancestor)
        if info is None or ancestor <= 1:
            return None
        name, parent, started = info
        if name not in SHELLS:
            return ancestor, started
        ancestor = parent
    return None


def _set_pdeathsig(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int, started: int) -> bool:
    info = _stat(pid)
    return info is not None and info[2] == started


def stop_with_parent(signum: int = signal.SIGTERM, only_under_dvc: bool = True) -> int | None:
    """From now on, send ``signum`` to this process when the process that runs it dies (its parent,
    or the first non-shell ancestor). Returns the watched pid (None: nothing watched).

    ``only_under_dvc``: act only in a ``dvc repro`` stage (DVC sets ``DVC_STAGE``); a stage run
    by hand or in a test process keeps its own lifetime.
    """
    if only_under_dvc and not os.environ.get("DVC_STAGE"):
        return None
    parent = os.getppid()
    _set_pdeathsig(signum)
    target = watched_ancestor()
    if os.getppid() != parent:  # the parent died before the death signal was set: stop now
        os.kill(os.getpid(), signum)
        return None
    if target is None:  # no /proc to read: the death signal alone watches the parent
        return None
    pid, started = target

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(POLL_SECONDS):
            if not _alive(pid, started):
                log.warning("the process that started this stage (pid %d) is gone: stopping", pid)
                os.kill(os.getpid(), signum)
                return

    threading.Thread(target=watch, name="stop-with-parent", daemon=True).start()
    return pid
