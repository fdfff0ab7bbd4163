"""`make repro`'s DVC call: `dvc repro` (any of its arguments) with DVC's per-stage chatter left out.

    python scripts/repro.py [dvc repro arguments]

Why: the terminal of `make repro` should hold the plan, a progress bar while a long stage runs and
one summary line per stage (op_sensitivity.logs; the line names the stage's full log). DVC adds four
lines per stage ("Running stage 'x':", the command, "Updating lock file", a blank line), which
say again what the summary line says. Those INFO records, and only those, are dropped, by their
message templates: DVC's warnings and errors pass, and so does everything a stage writes.
``OP_SENSITIVITY_VERBOSE=1`` (``make repro V=1``) keeps all of it. Plain ``dvc repro`` runs the
same stages with DVC's own output.
"""

from __future__ import annotations

import logging
import os
import sys

# dvc.stage.run, dvc.dvcfile, dvc.stage, dvc.repo.reproduce (DVC 3.x)
CHATTER = {
    "Running stage '%s':",
    "%s %s",  # "> <the stage's command>"
    "Updating lock file '%s'",
    "Generating lock file '%s'",  # the first run's (a fresh clone that has no dvc.lock)
    "Stage '%s' didn't change, skipping",
    "'%s' didn't change, skipping",
    "",  # the blank line after each stage
}
LOGGERS = ("dvc.stage.run", "dvc.dvcfile", "dvc.stage", "dvc.repo.reproduce")


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.msg not in CHATTER


def main(argv: list[str]) -> int:
    from dvc.cli import main as dvc_main

    if os.environ.get("OP_SENSITIVITY_VERBOSE", "") in ("", "0"):
        quiet = _Quiet()
        for name in LOGGERS:
            logging.getLogger(name).addFilter(quiet)
    return dvc_main(["repro", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
