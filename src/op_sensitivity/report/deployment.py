"""The report's Deployment section, from the quantize stage's documents (``op_sensitivity.quantize``).

Why here and not beside the writers: the report stage reads the documents only, so it depends on
no quantization tool and reruns when a target's document changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import read_json
from ..errors import InputError

FIELDS = (
    "target",
    "format",
    "artifact",
    "quantized",
    "kept",
    "runtime",
    "served",
    "runtime_differs",
    "measured",
    "predicted",
    "all_int8",
    "agreement",
)


def read_deployments(quantize_dir: Path, targets: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each listed target's document, checked for the fields the section reads."""
    docs = []
    for target in targets:
        path = quantize_dir / f"{target}.json"
        doc = read_json(path, "quantize document", f"quantize@{target}")
        missing = [f for f in FIELDS if not isinstance(doc, dict) or f not in doc]
        if missing:
            raise InputError(f"{path}: not a quantize document (missing {', '.join(missing)})")
        docs.append(doc)
    return docs


def section(docs: list[dict[str, Any]]) -> str:
    """The report's Deployment section: each target's artifact, measured in its runtime."""
    if not docs:
        return ""
    lines = [
        "## Deployment",
        "",
        "Each target's artifact, written by its tool from the keep-list chosen on its scheme's spectrum, "
        "loaded by the runtime that serves it (or, where the table says so, read back in a round trip "
        "of the export: not served here) and scored on the test split against fp32; beside it the "
        "native engine's prediction for the same list under the same scheme, and all-int8.",
        "",
        "| target | format | measured in | size MB | quantized | kept | metric | measured | predicted | "
        "ratio | bar | all-int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in docs:
        a = d["agreement"]
        ratio = "-" if a["ratio"] is None else f"{a['ratio']:.3g}"
        where = "its runtime" if d["served"] else "round trip, **not served here**"
        lines.append(
            f"| {d['target']} | {d['format']} | {where} | {d['artifact']['bytes'] / 1e6:.2f} | "
            f"{d['quantized']} | {len(d['kept'])} | {a['metric']} | {a['measured']:.4g} | "
            f"{a['predicted']:.4g} | {ratio} | "
            f"{'within' if within(a) else '**outside**'} {a['bar']:.3g} | {d['all_int8'][a['metric']]:.4g} |"
        )
    notes = []
    for d in docs:
        r = d["runtime"]
        notes.append(
            f"- {d['target']} ({r['loader']}): weights {r['weights']}; inputs {r['inputs']}; "
            f"matmul {r['matmul']}" + "".join(f"; {n}" for n in r.get("notes", []))
        )
        if not d["served"]:
            notes.append(f"  - **not served here**: {d['round_trip']}")
        notes.append(f"  - {_differs(d['runtime_differs'], d['quantized'])}")
        a = d["agreement"]
        verdict = "within" if within(a) else "**outside**"
        notes.append(
            f"  - measured vs predicted {verdict} its bar ({a['bar']:.3g} relative); the gap: {a['gap']}"
        )
        notes.extend(_causes(a))
    return "\n".join([*lines, "", *notes, ""])


def _causes(agreement: dict[str, Any]) -> list[str]:
    """The causes this run measured and the bar they give (``quantize.causes``); none: nothing."""
    causes = agreement.get("causes") or []
    if not causes:
        return []
    metric, p = agreement["metric"], agreement["predicted"]
    lines = [
        f"    - cause measured alone: {c['name']}, {metric} {c['value']:.4g} ({c['how']})" for c in causes
    ]
    if "bound" in agreement:
        total = p + sum(c["value"] for c in causes)
        lines.append(
            f"    - bar {agreement['floor']:g} (floor) + {agreement['bound']:.4g} / {p:.4g} (their bound: "
            f"{agreement['derivation']}); predicted + the causes = {total:.4g}, measured / that = "
            f"{agreement['measured'] / total:.4g}"
        )
    else:
        lines.append(f"    - bar: {agreement['derivation']}")
    return lines


def within(agreement: dict[str, Any]) -> bool:
    """The runtime's measured damage is within the target's bar of the prediction (relative;
    equal where the prediction is 0)."""
    m, p = agreement["measured"], agreement["predicted"]
    return m == p if not p else abs(m / p - 1) <= agreement["bar"]


def _differs(differs: dict[str, Any], quantized: int) -> str:
    """The runtime's own view of the list, in plain words."""
    if not differs["readable"]:
        return (
            "what the loaded runtime quantizes cannot be read off it; the artifact's own content was checked"
        )
    parts = []
    if differs["ignored"]:
        parts.append(
            f"the runtime runs {len(differs['ignored'])} listed op(s) in high precision anyway "
            f"({', '.join(differs['ignored'][:5])})"
        )
    if differs["added"]:
        parts.append(
            f"the runtime quantizes {len(differs['added'])} op(s) the list keeps "
            f"({', '.join(differs['added'][:5])})"
        )
    if not parts:
        return f"the loaded runtime quantizes exactly the {quantized} listed ops"
    return "**" + "; ".join(parts) + "**"
