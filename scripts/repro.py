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


RAN = "Running stage '%s':"
UNCHANGED = "Stage '%s' didn't change, skipping"


class _Quiet(logging.Filter):
    """Drops DVC's chatter and remembers which stages ran and which DVC found unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[str] = []
        self.unchanged: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == RAN and record.args:
            self.ran.append(str(record.args[0]))
        elif record.msg == UNCHANGED and record.args:
            self.unchanged.append(str(record.args[0]))
        return record.levelno > logging.INFO or record.msg not in CHATTER


def unchanged_line(quiet: _Quiet) -> str | None:
    """One line for every stage DVC found unchanged in a run where some other stage ran.

    A fresh clone's plan lists every stage (no output is there yet); a stage whose outputs are in
    git (crosscheck, check_params) is skipped once its regenerated inputs hash as dvc.lock records
    them, and its summary line never comes; in a later run, the stages whose inputs did not move
    are named too. With nothing run, DVC's own "up to date" line says it.
    """
    if not quiet.ran or not quiet.unchanged:
        return None
    return (
        f"not rerun, inputs as dvc.lock records them (the committed outputs stand): "
        f"{', '.join(quiet.unchanged)}"
    )


def main(argv: list[str]) -> int:
    from dvc.cli import main as dvc_main

    if os.environ.get("OP_SENSITIVITY_VERBOSE", "") not in ("", "0"):
        return dvc_main(["repro", *argv])
    quiet = _Quiet()
    for name in LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    rc = dvc_main(["repro", *argv])
    line = unchanged_line(quiet)
    if line:
        print(line, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
