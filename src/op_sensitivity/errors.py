"""Exceptions the stages turn into one clear line and a non-zero exit (see ``cli.run_stage``)."""

from __future__ import annotations


class PipelineError(Exception):
    """A failure the user can act on; its message is printed as-is instead of a traceback."""


class InputError(PipelineError):
    """Bad user input: the message names the file, field or parameter and what was expected."""


class CaptureError(PipelineError):
    """The sensitivity capture recorded nothing or too little: never write such a report as whole."""


def require(cond: bool, where: object, what: str) -> None:
    """Raise :class:`InputError` ``"<where>: <what>"`` unless ``cond``: one shape for every input check."""
    if not cond:
        raise InputError(f"{where}: {what}")
