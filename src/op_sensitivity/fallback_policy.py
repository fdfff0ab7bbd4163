"""Turn a ranked spectrum into "keep these ops in high precision" with a named policy.

Policies (``fallback.policy`` picks one; each reads its own params block):

* ``top_k``: the ``k`` most sensitive ops.
* ``top_fraction``: the top ``ceil(fraction * N)`` ops.
* ``threshold``: ops with ``score > value`` (``relative: true`` -> ``score > value * max score``).
* ``error_budget``: the fewest top ops whose cumulative share (``scores.cumulative_share``) reaches
  ``percent`` % of the total error.

Then ``always_keep`` adds and ``never_keep`` removes ops by glob on the module name (fnmatch,
e.g. ``lm_head``, ``model.visual.patch_embed.*``); ``never_keep`` wins. Every chosen op carries
the reason it was chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import pandas as pd

from .errors import InputError
from .scores import SELECTABLE_PHASES, cumulative_share

POLICIES = ("top_k", "top_fraction", "threshold", "error_budget")


@dataclass(frozen=True)
class FallbackParams:
    phase: str
    policy: str
    settings: dict[str, Any]
    always_keep: list[str] = field(default_factory=list)
    never_keep: list[str] = field(default_factory=list)
    onnx_model: str | None = None


def parse_fallback_params(raw: Any, where: str = "params.yaml: fallback") -> FallbackParams:
    """Validate the ``fallback`` params block (unknown policy, out-of-range values -> InputError)."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a mapping")
    phase, policy = raw.get("phase"), raw.get("policy")
    if phase not in SELECTABLE_PHASES:
        raise InputError(f"{where}.phase: expected one of {', '.join(SELECTABLE_PHASES)}, got {phase!r}")
    if policy not in POLICIES:
        raise InputError(f"{where}.policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    settings = raw.get(policy)
    if not isinstance(settings, dict):
        raise InputError(f"{where}.{policy}: expected a mapping with the policy's parameters")
    w = f"{where}.{policy}"
    _check(policy, settings, w)
    lists = {}
    for key in ("always_keep", "never_keep"):
        value = raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{where}.{key}: expected a list of glob patterns, got {value!r}")
        lists[key] = value
    onnx = raw.get("onnx_model")
    if onnx is not None and not isinstance(onnx, str):
        raise InputError(f"{where}.onnx_model: expected a path or null, got {onnx!r}")
    return FallbackParams(phase, policy, dict(settings), lists["always_keep"], lists["never_keep"], onnx)


def _number(settings: dict, key: str, w: str) -> float:
    value = settings.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{w}.{key}: expected a number, got {value!r}")
    return float(value)


def _check(policy: str, s: dict, w: str) -> None:
    if policy == "top_k":
        k = s.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"{w}.k: expected an integer >= 1, got {k!r}")
    elif policy == "top_fraction":
        if not 0 < _number(s, "fraction", w) <= 1:
            raise InputError(f"{w}.fraction: expected a fraction in (0, 1], got {s['fraction']!r}")
    elif policy == "threshold":
        _number(s, "value", w)
        if not isinstance(s.get("relative", False), bool):
            raise InputError(f"{w}.relative: expected true/false, got {s['relative']!r}")
    elif not 0 < _number(s, "percent", w) <= 100:
        raise InputError(f"{w}.percent: expected a percentage in (0, 100], got {s['percent']!r}")


def _policy_choice(df: pd.DataFrame, p: FallbackParams) -> tuple[list[str], str]:
    s, n = p.settings, len(df)
    if p.policy == "top_k":
        if s["k"] > n:
            raise InputError(
                f"params.yaml: fallback.top_k.k: expected at most {n} (ops scored), got {s['k']}"
            )
        return list(df["op_name"].iloc[: s["k"]]), f"top_k: rank <= {s['k']}"
    if p.policy == "top_fraction":
        k = math.ceil(s["fraction"] * n)
        return list(df["op_name"].iloc[:k]), f"top_fraction: rank <= {k} ({s['fraction']:g} of {n})"
    if p.policy == "threshold":
        cut = s["value"] * df["score"].max() if s.get("relative", False) else s["value"]
        label = f"{s['value']:g} x max score" if s.get("relative", False) else f"{s['value']:g}"
        return list(df.loc[df["score"] > cut, "op_name"]), f"threshold: score > {label} ({cut:.4g})"
    share = cumulative_share(df)
    target = s["percent"] / 100
    reached = share[share >= target - 1e-12]
    k = int(reached.index[0]) if len(reached) else n
    return list(df["op_name"].iloc[:k]), f"error_budget: top {k} ops cover >= {s['percent']:g}% of the error"


def choose(df: pd.DataFrame, p: FallbackParams) -> pd.DataFrame:
    """The chosen ops (most sensitive first) with a ``reason`` column."""
    chosen, reason = _policy_choice(df, p)
    reasons = dict.fromkeys(chosen, reason)
    for op, module in zip(df["op_name"], df["module"], strict=True):
        hit = next((g for g in p.always_keep if fnmatchcase(module, g)), None)
        if hit and op not in reasons:
            reasons[op] = f"always_keep: {hit}"
    for op, module in zip(df["op_name"], df["module"], strict=True):
        if any(fnmatchcase(module, g) for g in p.never_keep):
            reasons.pop(op, None)
    out = df[df["op_name"].isin(list(reasons))].copy()
    out["reason"] = [reasons[o] for o in out["op_name"]]
    return out.reset_index(drop=True)
