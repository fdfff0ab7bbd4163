"""The contract both engines fulfil: one validated pass specification in, raw per-call values out.

Why one contract: the INC engine and the native engine must score the same ops in the same
order under the same exclusions, or their spectra cannot be compared. :func:`build_spec`
validates everything once (bounds, exclusions and their reasons, the text-only vision rule)
and hands the same :class:`PassSpec` to whichever engine runs; an engine is a function
``run_pass(model, spec, workspace=..., on_call=...) -> PassResult``. ``engines.artifact``
turns a :class:`PassResult` into the same JSON whichever engine made it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import InputError
from ..inventory import OpInfo
from ..params import SensitivityParams
from ..schemes import Scheme, inc_cpu, load

OpKey = tuple[str, str]  # (op name, op type)
FP32 = {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}
# Mode text_only feeds no image: the vision tower never runs, so its observers would see nothing.
VISION_FP32 = {r"model\.visual\..*": FP32}


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


@dataclass(frozen=True)
class ExcludedOp:
    op_name: str
    op_type: str
    reason: str


@dataclass(frozen=True)
class PassSpec:
    """What to score and on which inputs; built and checked by :func:`build_spec` only.

    ``params.op_name_dict`` is the effective one (the text-only vision rule merged in), so an
    engine hands it to INC as it is.
    """

    ops: tuple[OpKey, ...]  # every quantizable op in module order; the last is where error is measured
    excluded: tuple[ExcludedOp, ...]  # kept fp32 by params, with the reason
    batches: tuple[dict[str, torch.Tensor], ...]  # one per confidence batch, in use order
    params: SensitivityParams
    model_sha256: str | None = None  # the model card's hash, when the runner knows it (resume keys on it)
    scheme: Scheme = field(default_factory=inc_cpu.describe)  # the numerics measured (native.scheme)

    @property
    def module_order(self) -> list[str]:
        return [name for name, _ in self.ops]

    @property
    def scored(self) -> list[OpKey]:
        skip = {e.op_name for e in self.excluded}
        return [k for k in self.ops if k[0] not in skip]

    def fingerprint(self, engine: str, numerics: dict[str, Any]) -> str:
        """What a pass's values are a function of: model, batches, params, engine and numerics."""
        h = hashlib.sha256()
        params = {k: v for k, v in asdict(self.params).items() if k != "params_file"}
        head = {
            "model": self.model_sha256,
            "ops": self.scored,
            "params": params,
            "engine": engine,
            "scheme": asdict(self.scheme),
            **numerics,
        }
        h.update(json.dumps(head, sort_keys=True, default=str).encode())
        for batch in self.batches:
            for key in sorted(batch):
                t = batch[key].detach().cpu().contiguous()
                h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    @property
    def confidence_batches(self) -> int:
        return len(self.batches)


@dataclass
class PassResult:
    capture: Capture
    op_order: list[OpKey]  # config order = module order; the last op is where error is measured
    excluded: list[ExcludedOp]
    measured_at: str
    conv3d_handling: str
    quantization: dict[str, Any]
    engine: str = "inc"
    requant_mode: str = "cumulative"  # "cumulative" (INC) | "isolated" (native only)
    all_int8_mse: float | None = None  # measured directly by engines that can (native)
    details: dict[str, Any] = field(default_factory=dict)  # settings that shape the numbers (device, dtype)
    runtime: dict[str, Any] = field(default_factory=dict)  # seconds and memory: never in a versioned artifact
    scheme: Scheme = field(
        default_factory=inc_cpu.describe
    )  # the deployment scheme the values were measured under
    screening: dict[str, Any] | None = None  # native screening: precision, bound, ops refined in float32


class Engine(Protocol):
    def __call__(
        self,
        model: nn.Module,
        spec: PassSpec,
        *,
        workspace: Path,
        on_call: Callable[[Capture], None] | None = None,
    ) -> PassResult: ...


def _wants_fp32(cfg: dict) -> bool:
    return any("fp32" in (cfg.get(part, {}).get("dtype") or []) for part in ("weight", "activation"))


def name_matches(pattern: str, module: str) -> bool:
    """An op_name_dict key against a module, as INC 3.7.1 matches it: ``re.fullmatch`` on its op names
    (``strategy.utils.tuning_space._merge_op_wise_cfg``), which are the module path or, where its
    tracing wrapped the module, ``<path>.module``."""
    return any(n == pattern or re.fullmatch(pattern, n) for n in (module, module + ".module"))


def type_matches(key: str, op_type: str) -> bool:
    """An op_type_dict key against an op type (the module's class name), as INC 3.7.1 matches it:
    ``re.fullmatch`` (``_merge_optype_wise_cfg``); a key that is no regex matches only itself."""
    if key == op_type:
        return True
    try:
        return re.fullmatch(key, op_type) is not None
    except re.error:
        return False


def exclusion_reason(module: str, op_type: str, op_type_dict: dict, op_name_dict: dict) -> str | None:
    """Why params keep this op fp32 (None if they do not): the one rule both engines report.

    op_name_dict keys are matched (exactly or as a regex) against the module path and INC's
    ``<path>.module`` name; op_type_dict keys against the type (:func:`name_matches`,
    :func:`type_matches`). Only entries asking for fp32 exclude.
    """
    for pattern, cfg in op_name_dict.items():
        if _wants_fp32(cfg) and name_matches(pattern, module):
            return f"kept fp32 by sensitivity.op_name_dict[{pattern!r}]"
    for key, cfg in op_type_dict.items():
        if _wants_fp32(cfg) and type_matches(key, op_type):
            return f"kept fp32 by sensitivity.op_type_dict[{key!r}]"
    return None


def check_op_dicts(params: SensitivityParams, inventory: list[OpInfo], source: Path | str) -> None:
    """Every op_name_dict key must match an op of the model and every op_type_dict key a type it has,
    matched as INC matches them: INC ignores a key that matches nothing, so a typo would give a pass
    (hours) and a report byte-identical to no setting. ``inventory``: the whole model's (``source``,
    named in the message), not a carved copy's, checked before any work."""
    names = [op.name for op in inventory]
    for pattern in params.op_name_dict:
        if not any(name_matches(pattern, n) for n in names):
            examples = ", ".join(
                repr(n) for n in dict.fromkeys([names[0], names[len(names) // 2], names[-1]])
            )
            raise InputError(
                f"{params.where('op_name_dict')}.{pattern}: matches no op of the model ({len(names)} ops in "
                f"{source}; e.g. {examples}; a key is a module name or a regular expression full-matched "
                "against it, as INC does)"
            )
    types = sorted({op.type for op in inventory})
    for key in params.op_type_dict:
        if not any(type_matches(key, t) for t in types):
            raise InputError(
                f"{params.where('op_type_dict')}.{key}: matches no op type of the model ({len(names)} ops "
                f"in {source}, of types {', '.join(types)})"
            )


def scheme_exclusion(scheme: Scheme, module: str, op_type: str) -> str | None:
    """Why the scheme's tool leaves this op in high precision (None if it quantizes it)."""
    if op_type not in scheme.op_types:
        return f"not quantized by scheme {scheme.name} (it quantizes {', '.join(scheme.op_types)})"
    for glob in scheme.skip:
        if fnmatch.fnmatchcase(module, glob):
            return f"left in high precision by scheme {scheme.name} (its tool's default skip {glob!r})"
    return None


def build_spec(
    params: SensitivityParams,
    inventory: list[OpInfo],
    batches: list[dict[str, torch.Tensor]],
    mode: str,
) -> PassSpec:
    """Validate a pass before any work (a pass can take hours); raise :class:`InputError` naming the param."""
    if params.confidence_batches > len(batches):
        raise InputError(
            f"{params.where('confidence_batches')}: expected at most {len(batches)} "
            f"(calibration batches), got {params.confidence_batches}"
        )
    params, excluded, scheme = exclusions(params, inventory, mode)
    ops = tuple((op.name, op.type) for op in inventory)
    spec = PassSpec(ops, tuple(excluded), tuple(batches[: params.confidence_batches]), params, scheme=scheme)
    check_scored(params, len(spec.scored))
    return spec


def exclusions(
    params: SensitivityParams, inventory: list[OpInfo], mode: str
) -> tuple[SensitivityParams, list[ExcludedOp], Scheme]:
    """The ops a pass keeps fp32 and why, with the params as the engines get them (the text-only
    vision rule merged into ``op_name_dict``) and the scheme measured. No model needed: the plan
    counts a pass's ops with it before anything loads."""
    scheme = load(params.native.scheme, params.where("native.scheme"))
    if params.engine == "inc" and scheme.name != "inc_cpu":
        raise InputError(
            f"{params.where('native.scheme')}: {scheme.name} is measured by engine native only "
            f"(INC computes its own scheme, inc_cpu); set {params.where('engine')} to native"
        )
    op_name_dict = dict(params.op_name_dict)
    if mode == "text_only":
        for pattern, cfg in VISION_FP32.items():
            op_name_dict.setdefault(pattern, cfg)
    params = replace(params, op_name_dict=op_name_dict)
    excluded = []
    for op in inventory:
        reason = exclusion_reason(op.name, op.type, params.op_type_dict, op_name_dict)
        reason = reason or scheme_exclusion(scheme, op.name, op.type)
        if reason is not None:
            excluded.append(ExcludedOp(op.name, op.type, reason))
    return params, excluded, scheme


def check_scored(params: SensitivityParams, scored: int) -> None:
    if scored == 0 and params.native.scheme != "inc_cpu":
        raise InputError(
            f"{params.where('op_name_dict')}: under scheme {params.native.scheme} every op is kept fp32 "
            "(op_name_dict, op_type_dict and the scheme's own skips); nothing to score: remove the "
            "scheme from schemes.run or score ops it quantizes"
        )
    if scored == 0:
        raise InputError(
            f"{params.where('op_name_dict')}: every op is kept fp32 (with op_type_dict); nothing to score"
        )
    n = params.native
    if n.screening == "first_order" and n.audit > scored:
        raise InputError(
            f"{params.where('native.audit')}: the first_order audit draws {n.audit} ops per phase, more "
            f"than the {scored} ops scored; set it to at most {scored}"
        )
    if scored > params.max_ops:
        raise InputError(
            f"{params.where('max_ops')}: the pass would score {scored} ops per phase, more "
            f"than max_ops={params.max_ops}; raise it or keep ops fp32 with op_name_dict/op_type_dict"
        )
