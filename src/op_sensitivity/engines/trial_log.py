"""Every trial's value on disk as it is measured, so a killed native pass resumes where it stopped."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

from ..atomic import atomic_file
from .contract import PassSpec
from .numerics import Numerics

log = logging.getLogger(__name__)

TRIAL_LOG = "native_trials.jsonl"


class TrialLog:
    """Every trial's value, appended the moment it is measured, so a killed pass resumes.

    The file (``<workspace>/native_trials.jsonl``) opens with the pass's fingerprint
    (:meth:`PassSpec.fingerprint`): values are reused only by a pass of the same model, batches,
    params, engine and numerics; a log of another pass is said to be ignored and is replaced.
    A line cut short by a kill ends the reusable part. JSON floats round-trip exactly, so a
    resumed pass reports the same bytes as an uninterrupted one.
    """

    def __init__(self, path: Path | None, fingerprint: str):
        self.values: dict[tuple, float] = {}
        self.resumed = 0
        self.loaded: set[tuple] = set()
        self.file = None
        if path is None:
            return
        if path.exists():
            lines = path.read_text().splitlines()
            head = _json_line(lines[0]) if lines else None
            if head is not None and head.get("fingerprint") == fingerprint:
                for line in lines[1:]:
                    rec = _json_line(line)
                    if rec is None:
                        break
                    self.values[tuple(rec["key"])] = rec["value"]
                self.loaded = set(self.values)
                log.info("resuming from %s: %d trials already measured by this pass", path, len(self.values))
            elif head is not None:
                log.warning("ignoring %s: it belongs to another pass (its fingerprint differs)", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(
                "".join(json.dumps(r) + "\n" for r in [{"fingerprint": fingerprint}, *self._records()])
            )
        self.file = path.open("a")

    def _records(self) -> list[dict]:
        return [{"key": list(k), "value": v} for k, v in self.values.items()]

    def get(self, key: tuple) -> float | None:
        value = self.values.get(key)
        self.resumed += value is not None and key in self.loaded  # not the values this run put
        return value

    def put(self, key: tuple, value: float) -> None:
        self.values[key] = value
        if self.file is not None:
            self.file.write(json.dumps({"key": list(key), "value": value}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _json_line(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


PACKAGE = Path(__file__).resolve().parents[1]


def code_digest(root: Path) -> str:
    """The library's source (every ``.py`` under ``root``, path and bytes). A log outlives its pass
    (a rerun of the same pass measures nothing again), so without this an engine fixed since, with
    the same params, model and batches, would resume the old code's values: DVC reruns the stage
    for the changed source and the spectrum would stay stale."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def this_code() -> str:
    """:func:`code_digest` of the running library, read once per process."""
    return code_digest(PACKAGE)


def pass_fingerprint(spec: PassSpec, num: Numerics) -> str:
    """What a trial log must match to be resumed: the spec's, the numerics that shape values and
    the code that measured them."""
    details = {**num.details(), "reduce_range": num.reduce_range, "code": this_code()}
    return spec.fingerprint("native", details)
