"""Shared entry-point behaviour for the thin stage scripts."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import PipelineError


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage: log to stderr, turn :class:`PipelineError` into one clear line and exit code 2.

    Other exceptions keep their traceback: they are bugs or environment failures, and hiding
    them would make a red run look like bad input.
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
