"""The one contract every deployment target implements (one file per backend, as transformers'
quantizers are organised).

Why a contract: the quantize stage does the same four things whatever the tool (check the tool is
installed, write the artifact from a module list, read back from the artifact what it quantizes,
load it in the runtime that serves it), and checks the same facts about each (the artifact
quantizes exactly the list it was given; nothing half-written). What differs per tool is only how.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import InputError
from .causes import Cause

Batch = dict[str, torch.Tensor]
Forward = Callable[[Batch], torch.Tensor]  # model inputs -> logits [batch, tokens, vocab]


@dataclass(frozen=True)
class Inputs:
    """What a target writes its artifact from.

    ``quantize``: the modules the artifact quantizes (the scheme's scored ops minus the keep-list,
    fused groups whole), in model order; every other module stays in high precision.
    ``calibration``: the calibration split's batches (the model's inputs, on the CPU), which the
    native prediction calibrates on too. ``workspace``: scratch space the stage removes.
    ``max_params``: ``crosscheck.whole_max_params``, the largest model a tool may convert whole
    (INC's PTQ holds several float32 copies; above it validate carves, which a deployment cannot).
    """

    model_dir: Path
    quantize: list[str]
    calibration: list[Batch]
    workspace: Path
    max_params: int


@dataclass
class Runtime:
    """An artifact loaded by the runtime that serves it: its logits, and what it computes (read off
    the loaded object, not assumed), for the report. ``quantized``: the modules the loaded runtime
    runs quantized, where it can be read off it (None: not readable); a runtime that drops or adds
    some is a finding the report states, not an error. ``dtype``: what its float arithmetic runs in."""

    forward: Forward
    loader: str
    weights: str
    inputs: str
    matmul: str
    notes: list[str] = field(default_factory=list)
    quantized: set[str] | None = None
    dtype: str = "float32"
    # the causes of its gap the runtime measures on itself (``quantize.causes``): (the test split's
    # scorer, the headline metric) -> causes; none by default
    causes: Callable[[Any, str], list[Cause]] = lambda scorer, metric: []
    close: Callable[[], None] = lambda: None

    def facts(self) -> dict[str, Any]:
        return {
            "loader": self.loader,
            "weights": self.weights,
            "inputs": self.inputs,
            "matmul": self.matmul,
            "notes": list(self.notes),
        }


class Target(ABC):
    """One deployment target. ``scheme``: the native scheme whose keep-list it deploys and whose
    prediction it is compared with. ``requires``: the import names of its tool, ``extra`` the pip
    command that installs them (named in the error when one is missing). ``bar``: how far the
    runtime's measured damage may sit from the prediction (relative, on ``curve.metric``), and
    ``gap`` why it is not zero: what the runtime computes differently from the scheme. A result
    outside the bar is a finding the report states, not an error. ``bar`` is the floor of the bar
    each run derives (``quantize.causes``); ``runs_stored_dtype``: the runtime computes in the
    model's stored dtype (a bf16 snapshot in bf16), a cause the stage measures when it is not the
    prediction's."""

    name: ClassVar[str]
    scheme: ClassVar[str]
    format: ClassVar[str]
    requires: ClassVar[tuple[str, ...]]
    extra: ClassVar[str]
    bar: ClassVar[float]
    gap: ClassVar[str]
    # None: what loads and scores the artifact is a runtime that serves it. Else why the figure is a
    # round trip of the export instead, and what would serve it: the report says "not served here".
    round_trip: ClassVar[str | None] = None
    runs_stored_dtype: ClassVar[bool] = False

    def gap_here(self) -> str:
        """``gap`` as it stands on this machine: a target whose runtime computes differently on
        some CPU kinds, in a way the prediction does not model, says so here."""
        return self.gap

    def require(self) -> None:
        """Refuse before anything is written when the tool is not installed."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise InputError(
                    f"quantize target {self.name}: {module} is not installed ({self.extra})"
                ) from exc

    @abstractmethod
    def write(self, inputs: Inputs, out_dir: Path) -> dict[str, Any]:
        """Write the artifact to ``out_dir``, all of it or nothing (``atomic_dir``); returns a record
        with at least ``bytes`` (on disk) and ``seconds``."""

    @abstractmethod
    def quantized_in(self, out_dir: Path) -> set[str]:
        """The modules the artifact quantizes, read back from the artifact itself (its tensors,
        config or graph), never from what was asked of the writer."""

    @abstractmethod
    def load(self, out_dir: Path, inputs: Inputs) -> Runtime:
        """The artifact as its runtime loads and runs it (CPU)."""


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
