"""Turn a ranked spectrum into "keep these ops in high precision" with a named policy.

Policies (``fallback.policy`` picks one; each reads its own params block):

* ``top_k``: the ``k`` most sensitive ops.
* ``top_fraction``: the top ``ceil(fraction * N)`` ops.
* ``threshold``: ops with ``score > value`` (``relative: true`` -> ``score > value * max score``).
* ``error_budget``: the fewest top ops whose cumulative share (``scores.cumulative_share``) reaches
  ``percent`` % of the total error.

Then ``always_keep`` adds and ``never_keep`` removes ops by glob on the module name (fnmatch,
e.g. ``lm_head``, ``model.visual.patch_embed.*``); ``never_keep`` wins. Every chosen op carries
the reason it was chosen. The params are checked by ``params.load_params`` (block ``fallback``).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase

import pandas as pd

from ..errors import InputError
from ..params import FallbackParams
from ..report.scores import cumulative_share


def _policy_choice(df: pd.DataFrame, p: FallbackParams) -> tuple[list[str], str]:
    s, n = p.settings, len(df)
    if p.policy == "top_k":
        if s["k"] > n:
            raise InputError(f"{p.where('top_k.k')}: expected at most {n} (ops scored), got {s['k']}")
        return list(df["op_name"].iloc[: s["k"]]), f"top_k: rank <= {s['k']}"
    if p.policy == "top_fraction":
        k = math.ceil(s["fraction"] * n)
        return list(df["op_name"].iloc[:k]), f"top_fraction: rank <= {k} ({s['fraction']:g} of {n})"
    if p.policy == "threshold":
        cut = s["value"] * df["score"].max() if s.get("relative", False) else s["value"]
        label = f"{s['value']:g} x max score" if s.get("relative", False) else f"{s['value']:g}"
        chosen = list(df.loc[df["score"] > cut, "op_name"])
        if not chosen:
            raise InputError(
                f"{p.where('threshold.value')}: selects no op (score > {cut:.4g}; the highest score is "
                f"{df['score'].max():.4g}); lower it"
            )
        return chosen, f"threshold: score > {label} ({cut:.4g})"
    share = cumulative_share(df)
    target = s["percent"] / 100
    reached = share[share >= target - 1e-12]
    k = int(reached.index[0]) if len(reached) else n
    return list(df["op_name"].iloc[:k]), f"error_budget: top {k} ops cover >= {s['percent']:g}% of the error"


def check_globs(p: FallbackParams, modules: list[str]) -> None:
    """A glob that matches no op of the model is a typo, not a choice: say so before choosing."""
    for key, globs in (("always_keep", p.always_keep), ("never_keep", p.never_keep)):
        for i, glob in enumerate(globs):
            if not any(fnmatchcase(m, glob) for m in modules):
                raise InputError(
                    f"{p.where(key)}[{i}]: {glob!r} matches no op of the model (module names look like "
                    f"{modules[-1]!r}; globs use fnmatch: * ? [seq])"
                )


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
