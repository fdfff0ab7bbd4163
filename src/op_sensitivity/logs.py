"""Where a stage's log goes: one summary line on the terminal, everything in a file.

Why: under ``make repro`` the terminal is what a user reads. INC logs hundreds of ``[INFO]`` lines
per pass through a handler of its own, and torch, ModelOpt and INC raise deprecation warnings in
every stage; between the plan and the end they buried the lines that say what a stage did. Every
record goes to ``logs/<stage>.log`` (rewritten by each run of the stage; git-ignored, no stage
reads it). The terminal gets one line per stage (``cli.run_stage``): its time, the first line of
its last INFO record of this project's (what it wrote, the keep-list's figure, the crosscheck's
verdict) and the log file's name; besides, this project's warnings and errors, and a third
party's errors. ``OP_SENSITIVITY_VERBOSE=1`` (``make repro V=1``) shows every record.

"This project's" records: loggers under ``op_sensitivity`` and the stages' own (named after the
stage). Any other logger (ONNX Runtime's quantizer logs on the root logger), and Python's warnings
(``logging.captureWarnings``: logger ``py.warnings``), is third-party. Whatever else a library writes
while the stage runs (pycocotools' and ModelOpt's prints, progress bars of transformers and
compressed-tensors, ONNX Runtime's C++ warnings, a subprocess's output) goes to the file too: the
stage's standard output and error are the log file then (:func:`third_party_output`), and the
terminal is reached through :func:`terminal_out` / :func:`terminal_err` (the plan, this
project's progress bars, the summary).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

VERBOSE_ENV = "OP_SENSITIVITY_VERBOSE"
LOG_DIR = Path("logs")
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
OURS = ("op_sensitivity", "__main__")
SUMMARY = "op_sensitivity.stage"  # the one line per stage (cli.run_stage)
_LAST: list[_LastLine] = []  # the stage's last line of its own, for the summary
_FILE: list[logging.FileHandler] = []  # the stage's log file handler, for third_party_output
_SCREEN: list[logging.StreamHandler] = []  # the terminal handler
_TERMINAL: dict[int, TextIO] = {}  # fd 1 / 2 as they were before third_party_output


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Ours(logging.Filter):
    """What the terminal shows: the summary line; this project's warnings and errors; a
    third-party record from ERROR up. Everything when verbose."""

    def __init__(self, stage: str, show_all: bool):
        super().__init__()
        self.ours = (*OURS, stage.split("@")[0])
        self.show_all = show_all

    def filter(self, record: logging.LogRecord) -> bool:
        if self.show_all or record.name == SUMMARY or record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.split(".")[0] in self.ours


class _LastLine(logging.Handler):
    """Keeps the first line of the last INFO record of this project: the stage's summary repeats
    it (what the stage wrote, the keep-list's figure, the crosscheck's verdict)."""

    def __init__(self, stage: str):
        super().__init__(logging.INFO)
        self.ours = (*OURS, stage.split("@")[0])
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        if (
            record.levelno == logging.INFO
            and record.name != SUMMARY
            and record.name.split(".")[0] in self.ours
        ):
            self.line = record.getMessage().splitlines()[0] if record.getMessage() else ""


def configure(stage: str, log_dir: Path = LOG_DIR) -> Path:
    """Terminal and file handlers on the root logger for a stage; returns the log file. A file that
    cannot be written is not worth failing a stage over: the terminal then shows everything."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    formatter = logging.Formatter(FORMAT)
    path = log_dir / f"{stage}.log"
    show_all = verbose()
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(path, mode="w", encoding="utf-8")
    except OSError as e:
        print(
            f"warning: {path}: not writable ({e.strerror}); every log line goes to the terminal",
            file=sys.stderr,
        )
        show_all = True
    else:
        to_file.setFormatter(formatter)
        root.addHandler(to_file)
        _FILE[:] = [to_file]
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(formatter)
    terminal.addFilter(_Ours(stage, show_all))
    root.addHandler(terminal)
    _SCREEN[:] = [terminal]
    _LAST[:] = [_LastLine(stage)]
    root.addHandler(_LAST[0])
    logging.captureWarnings(True)
    return path


@contextlib.contextmanager
def third_party_output() -> Iterator[None]:
    """The stage's standard output and error are its log file while it runs (file descriptors 1
    and 2, so C++ libraries and subprocesses are caught too); this project reaches the terminal
    through :func:`terminal_out` / :func:`terminal_err`. Not when verbose, nor without a log file.
    Restored on the way out, before ``run_stage`` prints an error line or Python a traceback."""
    if verbose() or not _FILE or _FILE[0].stream is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # a copy of each descriptor the Python stream writes to; a stream that is not fd 1 / 2 (a test's
    # StringIO) is out of dup2's reach and stays the terminal as it is
    saved = {fd: os.dup(fd) for fd, stream in ((1, sys.stdout), (2, sys.stderr)) if _writes_to(stream, fd)}
    _TERMINAL.update({1: sys.stdout, 2: sys.stderr})
    _TERMINAL.update({fd: os.fdopen(copy, "w", buffering=1, encoding="utf-8") for fd, copy in saved.items()})
    log_fd = _FILE[0].stream.fileno()  # shares the handler's file offset: nothing overwritten
    for fd in saved:
        os.dup2(log_fd, fd)
    screen = _SCREEN[0].setStream(_TERMINAL[2]) if _SCREEN else None
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if _SCREEN and screen is not None:
            _SCREEN[0].setStream(screen)
        for fd in saved:
            _TERMINAL[fd].flush()
            os.dup2(_TERMINAL[fd].fileno(), fd)
            _TERMINAL[fd].close()
        _TERMINAL.clear()


def _writes_to(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


def terminal_out() -> TextIO:
    """Standard output as the stage started with it: where the plan goes."""
    return _TERMINAL.get(1, sys.stdout)


def terminal_err() -> TextIO:
    """Standard error as the stage started with it: where this project's progress bars go."""
    return _TERMINAL.get(2, sys.stderr)


def last_line() -> str:
    """The first line of this stage's last INFO record of its own ("" if none)."""
    return _LAST[0].line if _LAST else ""


def adopt(name: str) -> None:
    """Send a library's logger through the root's handlers: INC's ``neural_compressor`` logger
    prints through a handler of its own and does not propagate."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
