"""The Pareto picture: damage on held-out captions against what a keep-list costs (PNG, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..phases import RANKINGS  # noqa: E402
from .metrics import damage  # noqa: E402

COLOURS = {"fallback": "#1f77b4", "requant": "#ff7f0e", "measured": "#2ca02c", "random": "grey"}
AXES = (
    ("n", "ops kept in high precision"),
    ("share_params_kept", "share of weight parameters kept"),
    ("effective_weight_bits", "effective weight bits"),
)


def pareto(curve: dict[str, Any], validation: dict[str, Any], path: Path) -> None:
    """Headline-metric damage against ops kept, params kept and effective bits; the chosen list starred."""
    metric = curve["metric"]
    fig, axes = plt.subplots(1, len(AXES), figsize=(6 * len(AXES), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], AXES, strict=True):
        for name in RANKINGS:
            pts = [p for p in curve["points"] if p["ranking"] == name]
            x = [p["n"] if key == "n" else p["cost"][key] for p in pts]
            ax.plot(x, [damage(p["values"], metric) for p in pts], ".-", color=COLOURS[name], label=name)
        worst = damage(curve["reference"]["all_int8"], metric)
        rnd = [r for r in curve["random"] if r["recovered"][metric]["mean"] is not None]
        x = [r["n"] if key == "n" else r["cost_mean"][key] for r in rnd]
        mean = [worst * (1 - r["recovered"][metric]["mean"]) for r in rnd]
        below = [m - worst * (1 - r["recovered"][metric]["max"]) for m, r in zip(mean, rnd, strict=True)]
        above = [worst * (1 - r["recovered"][metric]["min"]) - m for m, r in zip(mean, rnd, strict=True)]
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
            [cx], [damage(validation["chosen"]["values"], metric)], "*", color="red", ms=14, label="keep-list"
        )
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} damage vs fp32 (eval split)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Damage on held-out captions against the cost of keeping ops in high precision")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
