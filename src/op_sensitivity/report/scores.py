"""One sensitivity score per op and phase, higher = more sensitive, derived from INC's raw values.

Formulas (``E`` = the all-int8 error: the last point of the requant phase's cumulative curve,
which starts from all-fp32 in this pipeline's forced pass; ``all_int8_source`` says so):

* fallback: ``score = (E - mse) / E`` - the share of the all-int8 error removed by keeping only
  this op in fp32. INC's value is LOW for a sensitive op, so the sign flips. It can be slightly
  negative (noise: restoring the op changed nothing or made it worse).
* requant: ``score = (c_i - c_{i-1}) / E`` with ``c_0 = 0`` (all fp32) - the increment the op
  adds to INC's cumulative curve, as a share of the all-int8 error. These sum to 1 exactly.
  With the native engine's ``isolated`` requant mode: ``score = mse / E`` (only this op int8), and
  ``E`` is the all-int8 error the native engine measured directly (``all_int8_source: measured``).
* both: ``score`` = mean of the two phase scores; ``rank`` by the mean of the two phase ranks.

``rank`` 1 = most sensitive (ties broken by module position). Raw values stay beside the scores.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from ..engines.artifact import all_int8_error
from ..errors import InputError
from ..inventory import OpInfo
from ..phases import BOTH, FALLBACK, PHASES, REQUANT

ALL_INT8_SOURCE = "requant_last_point"
_DEPTH = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


def depth_of(module: str, tower: str, n_layers: dict[str, int]) -> int:
    """Layer index within the tower: -1 for the input op (patch/token embedding), L after the L layers."""
    m = _DEPTH.search(module)
    if m:
        return int(m.group(1))
    if "patch_embed" in module or "embed_tokens" in module:
        return -1
    return n_layers.get("text" if tower == "lm_head" else tower, 0)  # lm_head follows the decoder layers


def _with_ranks(df: pd.DataFrame) -> pd.DataFrame:
    df = df.sort_values(["score", "position"], ascending=[False, True], kind="stable").reset_index(drop=True)
    df["rank"] = range(1, len(df) + 1)
    return df


def all_int8_source(report: dict[str, Any]) -> str:
    return "measured" if "all_int8_mse" in report["metadata"] else ALL_INT8_SOURCE


def phase_scores(report: dict[str, Any], inventory: list[OpInfo]) -> dict[str, pd.DataFrame]:
    """Per phase: a DataFrame sorted most-sensitive first with raw ``mse``, ``score`` and ``rank``."""
    inv = {op.name: op for op in inventory}
    raw = {p: pd.DataFrame(report["phases"][p]["ops"]) for p in PHASES}
    cumulative = report["phases"][REQUANT].get("cumulative", True)
    all_int8 = all_int8_error(report)
    if not all_int8 > 0:
        raise InputError(
            f"sensitivity report: all-int8 error (last requant point) is {all_int8}; "
            "scores need a positive reference"
        )
    missing = sorted(set(raw[FALLBACK]["module"]) - set(inv))
    if missing:
        raise InputError(f"op inventory lacks modules of the sensitivity report: {missing[:5]}")
    n_layers = {}
    for op in inventory:
        m = _DEPTH.search(op.name)
        if m:
            n_layers[op.tower] = max(n_layers.get(op.tower, 0), int(m.group(1)) + 1)
    out = {}
    for phase, df in raw.items():
        df = (
            df.sort_values("position").drop(columns=["rank"]).rename(columns={"mse_per_batch": "mse_batches"})
        )
        if phase == FALLBACK:
            df["score"] = (all_int8 - df["mse"]) / all_int8
        elif cumulative:
            df["score"] = df["mse"].diff().fillna(df["mse"].iloc[0]) / all_int8
        else:  # isolated requant (native engine): the error with only this op int8
            df["score"] = df["mse"] / all_int8
        df["params"] = [inv[m].params for m in df["module"]]
        df["depth"] = [depth_of(m, t, n_layers) for m, t in zip(df["module"], df["tower"], strict=True)]
        df["phase"] = phase
        out[phase] = _with_ranks(df)
    return out


def combined_scores(scores: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Both phases by rank: mean rank orders, mean score is kept for thresholds and budgets."""
    fb = scores[FALLBACK].set_index("op_name")
    rq = scores[REQUANT].set_index("op_name")
    common = fb.index.intersection(rq.index)
    df = fb.loc[common].copy()
    df["score"] = (fb.loc[common, "score"] + rq.loc[common, "score"]) / 2
    df["mean_rank"] = (fb.loc[common, "rank"] + rq.loc[common, "rank"]) / 2
    df["phase"] = BOTH
    df = (
        df.reset_index()
        .sort_values(["mean_rank", "score", "position"], ascending=[True, False, True], kind="stable")
        .reset_index(drop=True)
    )
    df["rank"] = range(1, len(df) + 1)
    return df


def select_phase(scores: dict[str, pd.DataFrame], phase: str) -> pd.DataFrame:
    return combined_scores(scores) if phase == BOTH else scores[phase]


def agreement(scores: dict[str, pd.DataFrame], top: int = 5) -> tuple[float, pd.DataFrame]:
    """Spearman rank correlation of the two phases' scores and the ops they disagree on most."""
    fb = scores[FALLBACK].set_index("op_name")
    rq = scores[REQUANT].set_index("op_name")
    common = fb.index.intersection(rq.index)
    rho = float(fb.loc[common, "score"].corr(rq.loc[common, "score"], method="spearman"))
    diff = pd.DataFrame(
        {
            "op_name": common,
            "tower": fb.loc[common, "tower"].values,
            "fallback_rank": fb.loc[common, "rank"].values,
            "requant_rank": rq.loc[common, "rank"].values,
        }
    )
    diff["rank_gap"] = (diff["fallback_rank"] - diff["requant_rank"]).abs()
    worst = diff.sort_values(["rank_gap", "fallback_rank"], ascending=[False, True]).head(top)
    return rho, worst.reset_index(drop=True)


def cumulative_share(df: pd.DataFrame) -> pd.Series:
    """Share of the total (positive) score covered by keeping the top-n ops in fp32, n = 1..N.

    For requant the increments are additive by construction, so this is the share of the
    all-int8 error; for fallback it is the share of the summed per-op scores (an approximation:
    restoring two ops does not in general remove the sum of their single-op effects).
    """
    positive = df["score"].clip(lower=0)
    total = positive.sum()
    if total <= 0:
        return pd.Series([0.0] * len(df), index=range(1, len(df) + 1))
    return pd.Series((positive.cumsum() / total).to_numpy(), index=range(1, len(df) + 1))
