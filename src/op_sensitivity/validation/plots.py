"""The Pareto picture: damage on held-out captions against what a keep-list costs (PNG, headless).

The rankings' curves and the random lists are the curve stage's (selection split), the chosen
list is validate's (test split): the damage is drawn as a share of each split's own all-int8
damage, so the two splits share one axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..phases import RANKINGS  # noqa: E402

COLOURS = {"fallback": "#1f77b4", "requant": "#ff7f0e", "measured": "#2ca02c", "random": "grey"}
AXES = (
    ("n", "ops kept in high precision"),
    ("share_params_kept", "share of weight parameters kept"),
    ("effective_weight_bits", "effective weight bits"),
)


def pareto(curve: dict[str, Any], validation: dict[str, Any], path: Path) -> None:
    """Headline-metric damage left (share of all-int8's) against ops kept, params kept and effective
    bits; the chosen list starred."""
    metric = curve["metric"]

    def left(share: float | None) -> float:
        return 0.0 if share is None else 1 - share  # None: all-int8 did no damage, none left

    fig, axes = plt.subplots(1, len(AXES), figsize=(6 * len(AXES), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], AXES, strict=True):
        for name in RANKINGS:
            pts = [p for p in curve["points"] if p["ranking"] == name]
            x = [p["n"] if key == "n" else p["cost"][key] for p in pts]
            ax.plot(x, [left(p["recovered"][metric]) for p in pts], ".-", color=COLOURS[name], label=name)
        rnd = [r for r in curve["random"] if r["recovered"][metric]["mean"] is not None]
        x = [r["n"] if key == "n" else r["cost_mean"][key] for r in rnd]
        mean = [left(r["recovered"][metric]["mean"]) for r in rnd]
        below = [m - left(r["recovered"][metric]["max"]) for m, r in zip(mean, rnd, strict=True)]
        above = [left(r["recovered"][metric]["min"]) - m for m, r in zip(mean, rnd, strict=True)]
        # Random lists of one size differ in cost: the cost panels place each size at its mean cost.
        ax.errorbar(
            x,
            mean,
            yerr=[below, above],
            fmt="o",
            ms=3,
            color=COLOURS["random"],
            alpha=0.6,
            label="random (min-max)",
        )
        chosen = validation["keep_list"]
        cx = chosen["ops"] if key == "n" else chosen[key]
        ax.plot(
            [cx],
            [left(validation["chosen"]["recovered"][metric])],
            "*",
            color="red",
            ms=14,
            label="keep-list (test split)",
        )
        ax.set_xlabel(label)
        ax.set_ylabel(f"share of all-int8 {metric} damage left")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "Damage left against the cost of keeping ops in high precision "
        "(curves: selection split; keep-list: test split)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
