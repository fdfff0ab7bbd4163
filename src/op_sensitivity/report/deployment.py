"""The report's Deployment section, from the quantize stage's documents (``op_sensitivity.quantize``).

Why here and not beside the writers: the report stage reads the documents only, so it depends on
no quantization tool and reruns when a target's document changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..atomic import read_json
from ..errors import InputError

FIELDS = ("target", "format", "artifact", "kept", "runtime", "measured", "predicted", "all_int8", "agreement")


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
        "loaded by the runtime that serves it and scored on the test split against fp32; beside it the "
        "native engine's prediction for the same list under the same scheme, and all-int8.",
        "",
        "| target | format | size MB | kept | metric | measured | predicted | ratio | all-int8 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in docs:
        a = d["agreement"]
        ratio = "-" if a["ratio"] is None else f"{a['ratio']:.3g}"
        lines.append(
            f"| {d['target']} | {d['format']} | {d['artifact']['bytes'] / 1e6:.2f} | {len(d['kept'])} | "
            f"{a['metric']} | {a['measured']:.4g} | {a['predicted']:.4g} | {ratio} | "
            f"{d['all_int8'][a['metric']]:.4g} |"
        )
    notes = [
        f"- {d['target']} ({d['runtime']['loader']}): weights {d['runtime']['weights']}; inputs "
        f"{d['runtime']['inputs']}; matmul {d['runtime']['matmul']}"
        for d in docs
    ]
    return "\n".join([*lines, "", *notes, ""])
