"""What a sensitivity engine hands to the report: raw per-call values, op order, exclusions.

Engine-neutral on purpose: the INC engine fills it from INC's helpers, the native engine from
its own trials, and ``sensitivity_report`` builds the same JSON from either.
"""

from __future__ import annotations

import re
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


def params_exclusion(module: str, op_type: str, op_type_dict: dict, op_name_dict: dict) -> str | None:
    """Why params keep this op fp32 (None if they do not); one rule for both engines.

    op_name_dict keys are matched (exactly or as a regex) against the module path and INC's
    ``<path>.module`` name; op_type_dict by type. Only entries asking for fp32 exclude.
    """

    def wants_fp32(cfg: dict) -> bool:
        return any("fp32" in (cfg.get(part, {}).get("dtype") or []) for part in ("weight", "activation"))

    for pattern, cfg in op_name_dict.items():
        if wants_fp32(cfg) and any(
            n == pattern or re.fullmatch(pattern, n) for n in (module, module + ".module")
        ):
            return f"kept fp32 by sensitivity.op_name_dict[{pattern!r}]"
    cfg = op_type_dict.get(op_type)
    if cfg is not None and wants_fp32(cfg):
        return f"kept fp32 by sensitivity.op_type_dict[{op_type!r}]"
    return None
