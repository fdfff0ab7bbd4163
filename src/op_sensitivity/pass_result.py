"""What a sensitivity engine hands to the report: raw per-call values, op order, exclusions.

Engine-neutral on purpose: the INC engine fills it from INC's helpers, the native engine from
its own trials, and ``sensitivity_report`` builds the same JSON from either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OpKey = tuple[str, str]  # (op name, op type)


@dataclass
class HelperCall:
    """One phase x one confidence batch: every op's raw value in trial order."""

    phase: str  # "fallback" | "requant"
    batch: int
    main: list[tuple[OpKey, float]] = field(default_factory=list)
    double_check: list[tuple[OpKey, float]] | None = None  # INC's second fallback pass, if it ran
    returned: list[OpKey] = field(default_factory=list)  # the engine's own ordering (INC: its return value)
    seconds: float = 0.0


@dataclass
class Capture:
    calls: list[HelperCall] = field(default_factory=list)

    def phase(self, name: str) -> list[HelperCall]:
        return [c for c in self.calls if c.phase == name]


@dataclass
class ExcludedOp:
    op_name: str
    op_type: str
    reason: str


@dataclass
class PassResult:
    capture: Capture
    op_order: list[OpKey]  # config order = module order; the last op is where error is measured
    excluded: list[ExcludedOp]
    measured_at: str
    seconds: dict[str, float]
    conv3d_handling: str
    quantization: dict[str, Any]
    engine: str = "inc"
    requant_mode: str = "cumulative"  # "cumulative" (INC) | "isolated" (native only)
    all_int8_mse: float | None = None  # measured directly by engines that can (native)
    extra: dict[str, Any] = field(default_factory=dict)  # engine-specific metadata (device, memory, ...)
