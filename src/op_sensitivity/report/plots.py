"""PNG plots of a sensitivity spectrum (matplotlib, headless).

Why PNG beside DVC's plot declarations: ``dvc plots show`` writes HTML that loads vega from a
CDN, which renders blank offline; a PNG always opens.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..phases import FALLBACK, REQUANT  # noqa: E402
from .scores import cumulative_share  # noqa: E402

TOWER_COLOURS = {"vision": "#1f77b4", "text": "#ff7f0e", "lm_head": "#2ca02c"}
PHASE_TITLES = {FALLBACK: "fallback (only this op fp32)", REQUANT: "requant (increment of INC's curve)"}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spectrum(scores: dict[str, pd.DataFrame], path: Path, top: int = 40) -> None:
    """Sorted score per op, coloured by tower; symlog scale when the positive scores span > 2 decades."""
    fig, axes = plt.subplots(
        1, len(scores), figsize=(7 * len(scores), max(4, 0.22 * min(top, 60) + 1.5)), squeeze=False
    )
    for ax, (phase, df) in zip(axes[0], scores.items(), strict=True):
        d = df.head(top).iloc[::-1]
        ax.barh(d["module"], d["score"], color=[TOWER_COLOURS.get(t, "grey") for t in d["tower"]])
        pos = d.loc[d["score"] > 0, "score"]
        if len(pos) > 1 and pos.max() / pos.min() > 100:
            # symlog, not log: zero and slightly negative scores (noise) stay visible.
            ax.set_xscale("symlog", linthresh=float(pos.min()))
        ax.set_title(f"{PHASE_TITLES[phase]}: top {len(d)} of {len(df)}")
        ax.set_xlabel("score = share of the all-int8 error (higher = more sensitive)")
        ax.tick_params(axis="y", labelsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in TOWER_COLOURS.values()]
    axes[0][0].legend(handles, list(TOWER_COLOURS), loc="lower right")
    _save(fig, path)


def _role(module: str) -> str:
    """Short legend label: the op's role inside its layer (``up_proj``, ``patch_embed``, ``merger.mlp.0``)."""
    for marker in ("patch_embed", "merger"):
        if marker in module:
            return module[module.index(marker) :].removesuffix(".proj")
    return module.rsplit(".", 1)[-1]


def depth(scores: dict[str, pd.DataFrame], path: Path) -> None:
    """Score against layer depth, one panel per tower, one marker per op type."""
    towers = [t for t in ("vision", "text") if any((df["tower"] == t).any() for df in scores.values())]
    fig, axes = plt.subplots(
        len(scores), max(1, len(towers)), figsize=(6 * max(1, len(towers)), 3.5 * len(scores)), squeeze=False
    )
    for row, (phase, df) in enumerate(scores.items()):
        for col, tower in enumerate(towers):
            ax = axes[row][col]
            d = df[df["tower"] == tower]
            for role, g in d.groupby(d["module"].map(_role)):
                ax.plot(g["depth"], g["score"], "o", label=role, alpha=0.8)
            ax.set_title(f"{tower} tower - {phase}")
            ax.set_xlabel("layer depth (-1 = embedding, last = after the layers)")
            ax.set_ylabel("score")
            ax.legend(fontsize=6, ncol=2)
    _save(fig, path)


def cumulative(scores: dict[str, pd.DataFrame], path: Path) -> None:
    """How much of the error N ops kept in fp32 remove, by the cumulative share of the ranked scores."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for phase, df in scores.items():
        share = cumulative_share(df)
        ax.plot(share.index, share.values * 100, marker=".", label=phase)
    ax.set_xlabel("ops kept in fp32 (most sensitive first)")
    ax.set_ylabel("cumulative share of error removed (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def requant_curve(requant: pd.DataFrame, path: Path) -> None:
    """INC's cumulative requant curve itself, in quantization order."""
    d = requant.sort_values("position")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(d["position"], d["mse"], "-", color="grey", alpha=0.6)
    for tower, g in d.groupby("tower"):
        ax.plot(g["position"], g["mse"], "o", color=TOWER_COLOURS.get(tower, "grey"), label=tower, ms=4)
    ax.set_xlabel("position (ops quantized cumulatively, module order)")
    ax.set_ylabel("error at the logits (sum of squares)")
    ax.set_title("requant phase: cumulative error curve")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
