"""Shared entry-point behaviour for the thin stage scripts."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import PipelineError

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
    """Run a stage: log to stderr, turn :class:`PipelineError` into one clear line and exit code 2.

    SIGTERM / SIGHUP / Ctrl-C unwind through the stage's cleanup (no temporary output is left)
    and exit with 128 + the signal number, as a shell reports a killed command. Other
    exceptions keep their traceback: they are bugs or environment failures, and hiding them
    would make a red run look like bad input.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in CAUGHT_SIGNALS}
    _PENDING.clear()
    try:
        main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        _what_dvc_did()
        sys.exit(2)
    except (Terminated, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        name = signal.Signals(signum).name
        if os.environ.get("DVC_STAGE"):
            print(f"error: stopped by {name}; nothing of this run was written", file=sys.stderr)
            _what_dvc_did()
        else:
            print(f"error: stopped by {name}; outputs left as they were before this run", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        _PENDING.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
