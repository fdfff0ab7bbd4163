"""Where a stage's log goes: this project's lines on the terminal, everything in a file.

Why: under ``make repro`` the terminal is what a user reads. INC logs hundreds of ``[INFO]`` lines
per pass through a handler of its own, and torch, ModelOpt and INC raise deprecation warnings in
every stage; between the plan and the end they buried the lines that say what a stage did. Every
record still goes to ``logs/<stage>.log`` (rewritten by each run of the stage; git-ignored, no
stage reads it), and the stage's last line names that file. ``OP_SENSITIVITY_VERBOSE=1`` (``make
repro V=1``) shows the third-party records on the terminal as well.

"This project's" records: loggers under ``op_sensitivity``, the stages' own (named after the
stage), and the root logger. Any other logger, and Python's warnings (``logging.captureWarnings``:
logger ``py.warnings``), is third-party: it reaches the terminal only at ERROR and above.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

VERBOSE_ENV = "OP_SENSITIVITY_VERBOSE"
LOG_DIR = Path("logs")
FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
OURS = ("op_sensitivity", "root", "__main__")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _Ours(logging.Filter):
    """Pass this project's records, and third-party ones from ERROR up (or all when verbose)."""

    def __init__(self, stage: str, show_all: bool):
        super().__init__()
        self.ours = (*OURS, stage.split("@")[0])
        self.show_all = show_all

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".")[0]
        return self.show_all or top in self.ours or record.levelno >= logging.ERROR


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
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setFormatter(formatter)
    terminal.addFilter(_Ours(stage, show_all))
    root.addHandler(terminal)
    logging.captureWarnings(True)
    return path


def adopt(name: str) -> None:
    """Send a library's logger through the root's handlers: INC's ``neural_compressor`` logger
    prints through a stream handler of its own and does not propagate."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
