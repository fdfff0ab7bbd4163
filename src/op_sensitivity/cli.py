"""Shared entry-point behaviour for the thin stage scripts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

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


def pass_input_parser(doc: str | None) -> argparse.ArgumentParser:
    """Arguments every stage that runs a sensitivity pass reads (the same files, the same defaults)."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--calibration", default="data/calibration", type=Path)
    ap.add_argument("--model", default="models/qwen2_5_vl", type=Path)
    ap.add_argument("--inventory", default="reports/model/op_inventory.json", type=Path)
    return ap
