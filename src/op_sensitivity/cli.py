"""Shared entry-point behaviour for the thin stage scripts."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import logs
from .atomic import committed, forget_committed
from .errors import PipelineError
from .lifetime import stop_with_parent

CAUGHT_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """SIGTERM / SIGHUP as an exception, so the same cleanup as for errors runs (``atomic``).

    A BaseException, like KeyboardInterrupt: no ``except Exception`` may swallow a kill.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_PENDING: list[int] = []  # signals received in this stage: some library code may drop the exception


def _raise_terminated(signum: int, _frame) -> None:
    _PENDING.append(signum)
    raise Terminated(signum)


def raise_if_terminated() -> None:
    """Raise again a SIGTERM / SIGHUP whose exception a library swallowed.

    INC's FX tracing falls back to sub-module tracing inside bare ``except:`` clauses, which catch
    the :class:`Terminated` a signal raises there and go on with the pass; long loops call this
    between steps (INC's per-op loop, after a pass) so the kill still unwinds before any output.
    """
    if _PENDING:
        raise Terminated(_PENDING[0])


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage: this project's log lines to stderr and every line to ``logs/<stage>.log``
    (:mod:`.logs`), one summary line at the end naming that file; turn :class:`PipelineError` into
    one clear line and exit code 2.

    An ``OSError`` that names a path (a file where a directory must be made, a directory where a
    file is written, no permission) is a problem with that path, not a bug: one line naming it
    (``error: <path>: <reason>``), exit code 2. SIGTERM / SIGHUP / Ctrl-C unwind through the
    stage's cleanup (no temporary output is left) and exit with 128 + the signal number, as a
    shell reports a killed command; the message names what this run had already renamed into
    place (``atomic.committed``), if anything. Other exceptions keep their traceback: they are
    bugs or environment failures, and hiding them would make a red run look like bad input.
    """
    stage = os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem
    log_file = logs.configure(stage)
    start = time.perf_counter()
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in CAUGHT_SIGNALS}
    _PENDING.clear()
    forget_committed()
    try:
        stop_with_parent()  # under dvc repro: a killed `dvc repro` stops this stage too
        with logs.third_party_output():
            main()
        said = logs.last_line()
        logging.getLogger(logs.SUMMARY).info(
            "%s done in %.1f s%s; full log: %s",
            stage,
            time.perf_counter() - start,
            f": {said}" if said else "",
            log_file,
        )
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        _what_dvc_did()
        sys.exit(2)
    except OSError as e:
        if e.filename is None:
            raise
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        _what_dvc_did()
        sys.exit(2)
    except (Terminated, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"error: {stopped_line(signal.Signals(signum).name)}", file=sys.stderr)
        if os.environ.get("DVC_STAGE"):
            _what_dvc_did()
        sys.exit(128 + signum)
    finally:
        _PENDING.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def os_error_line(e: OSError) -> str:
    """``<path>: <reason>`` (``<path> -> <other>`` for a rename), what the user can act on; where a
    file stands where a directory must be, the file is named (``mkdir -p reports/quantize`` fails
    with ENOTDIR naming ``reports/quantize`` when ``reports`` is the file)."""
    where = str(e.filename) if e.filename2 is None else f"{e.filename} -> {e.filename2}"
    reason = e.strerror or type(e).__name__
    hint = ""
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        path = Path(os.fsdecode(e.filename))
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            hint = f" ({blocking} is a file, where a directory must be)"
    elif e.errno == errno.EISDIR:
        hint = " (a directory is where a file must be written)"
    return f"{where}: {reason}{hint}"


def stopped_line(name: str) -> str:
    """What a stopped run wrote: nothing (the outputs are as before it; under ``dvc repro`` DVC had
    removed them already, :func:`_what_dvc_did`), or the paths it had renamed into place."""
    done = committed()
    if done:
        paths = ", ".join(dict.fromkeys(str(p) for p in done))
        line = f"stopped by {name} after this run had written {paths}"
        return line if os.environ.get("DVC_STAGE") else f"{line}; every other output is as before it"
    if os.environ.get("DVC_STAGE"):
        return f"stopped by {name}; nothing of this run was written"
    return f"stopped by {name}; outputs left as they were before this run"


def _what_dvc_did() -> None:
    """Under ``dvc repro`` (which sets ``DVC_STAGE``) the stage's previous outputs were deleted by
    DVC before this command started: say so, and how to get them back, instead of implying they
    are intact."""
    stage = os.environ.get("DVC_STAGE")
    if stage:
        print(
            f"note: dvc repro removed stage {stage}'s previous outputs before starting it; "
            "`make restore` brings back the last committed run",
            file=sys.stderr,
        )


def pass_input_parser(doc: str | None) -> argparse.ArgumentParser:
    """Arguments every stage that runs a sensitivity pass reads (the same files, the same defaults)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--calibration", default="data/calibration", type=Path)
    ap.add_argument("--model", default="models/qwen2_5_vl", type=Path)
    ap.add_argument("--inventory", default="reports/model/op_inventory.json", type=Path)
    return ap
