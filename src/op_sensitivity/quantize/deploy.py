"""One deployment target: its artifact from its scheme's keep-list, measured in the runtime that loads it.

Why measured there: a keep-list is only as good as the model a runtime executes from it (a fused
layer split, a name the runtime does not match, a 2-D activation quantized per tensor). Each
target writes its artifact with the tool's own code, loads it back with the runtime that serves
it, and scores it on the test split with the project's caption metrics, next to the native
engine's prediction for the same list under the same scheme (and all-int8, for scale).

Document (``reports/quantize/<target>.json``)::

    target, scheme, format
    artifact: {path, bytes, keep_list: {path, sha256}, spectrum: {path, sha256}}   the same sources
                                are in the artifact itself (``op_sensitivity_source.json``, with the
                                modules it quantizes and keeps), for a copy pulled without this document
    quantized: int              how many of the pass's scored ops the artifact quantizes (read back)
    kept: [module]              the scored ops it keeps in high precision (the prediction's list)
    runtime_differs: {readable, ignored, added}   what the loaded runtime runs quantized, against the list
    runtime: {...}              what the runtime computes for the artifact
    measured, predicted, all_int8: {kl, top1, nll, logit_se, ...}   test split, against fp32
    agreement: {metric, measured, predicted, ratio, bar, gap}   bar: the target's tolerance (relative);
                                gap: what its runtime computes differently from the scheme

Metrics (``reports/deploy/<target>.json``, DVC; ``m`` = ``curve.metric``): ``m_int8``, ``m_kept``
(measured in the runtime), ``m_native`` (the native prediction), ``size_mb``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import dump_json
from ..engines.contract import check_scored
from ..errors import InputError
from ..inventory import OpInfo
from ..params import FUSED_TARGETS, MAIN_PASS_TARGETS, TARGET_SCHEMES, Params, SensitivityParams
from ..validation.inputs import open_measurer, scored_and_excluded
from ..validation.measure import TEST, Scorer
from .base import Batch, Inputs, Target, dir_bytes

log = logging.getLogger(__name__)

PROVENANCE = "op_sensitivity_source.json"  # in the artifact: the keep-list and spectrum it came from

SCHEME = TARGET_SCHEMES  # target -> the scheme its keep-list comes from (checked in params)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def keep_list_path(fallback_dir: Path, target: str) -> Path:
    """The list a target deploys: its scheme's, or the main pass's (``inc``)."""
    if target in MAIN_PASS_TARGETS:
        return fallback_dir / "fallback_ops.json"
    return fallback_dir / "schemes" / f"{SCHEME[target]}.json"


def to_quantize(
    keep_list: dict[str, Any], report: dict[str, Any], inventory: list[OpInfo], fused: bool
) -> list[str]:
    """The modules the artifact quantizes: the scheme's scored ops less the list and what the
    scheme's pass kept (its tool's skips, the params' fp32 ops), in model order. ``fused``: the
    target's runtime fuses q/k/v and gate/up, so a list that splits a group is refused and the
    pass's kept ops bring their groups. The prediction quantizes the same ones."""
    scored, excluded = scored_and_excluded(report)
    listed = {o["module"] for o in keep_list["ops"]} & set(scored)
    keep = listed | set(excluded)
    if fused:
        check_fused_groups(listed, inventory)
        keep = whole_groups(keep, inventory)
    return [m for m in scored if m not in keep]


def whole_groups(keep: set[str], inventory: list[OpInfo]) -> set[str]:
    """``keep`` with every fused group it touches kept whole: an op the params keep fp32 (a lone
    ``v_proj`` in op_name_dict) brings its group, as the runtime runs the group as one GEMM."""
    group = {op.name: op.fused_group for op in inventory}
    touched = {group[m] for m in keep if group.get(m)}
    return keep | {name for name, g in group.items() if g in touched}


def check_fused_groups(keep: set[str], inventory: list[OpInfo]) -> None:
    """A runtime fuses q/k/v and gate/up into one GEMM: a group is kept or quantized whole, or the
    artifact would not load (vLLM) or would quantize the kept part anyway. Refused before writing."""
    groups: dict[str, set[str]] = {}
    for op in inventory:
        if op.fused_group:
            groups.setdefault(op.fused_group, set()).add(op.name)
    for group, members in sorted(groups.items()):
        part = members & keep
        if part and part != members:
            raise InputError(
                f"keep-list splits fused group {group}: keeps {sorted(part)} but not "
                f"{sorted(members - part)} (set fallback.fused_groups: true, or keep the whole group)"
            )


def quantize_target(
    name: str,
    params: Params,
    dirs: dict[str, Path],
    keep_list: dict[str, Any],
    report: dict[str, Any],
    inventory: list[OpInfo],
    out_dir: Path,
) -> dict[str, Any]:
    """Write the target's artifact to ``out_dir`` and measure it; the document (module doc).
    ``dirs``: model, calibration, test, keep_list, spectrum (paths). The tool and the list are
    checked before anything is written; an artifact that does not quantize exactly the list's
    complement is removed and refused."""
    from .targets import target as make_target  # the tools: imported only when a target runs

    target = make_target(name)
    target.require()
    quantize = to_quantize(keep_list, report, inventory, name in FUSED_TARGETS)
    if not quantize:
        raise InputError(
            f"{dirs['keep_list']}: keeps every op of the {target.scheme} pass (nothing to quantize)"
        )
    scored, _ = scored_and_excluded(report)
    check_scored(params.sensitivity, len(scored))
    sens = replace(params.sensitivity, native=replace(params.sensitivity.native, scheme=target.scheme))
    keep = [m for m in scored if m not in set(quantize)]
    predicted, all_int8, scorer, calibration = _predict(sens, params.curve.batch_size, dirs, report, keep)
    with tempfile.TemporaryDirectory(prefix="quantize-") as workspace:
        inputs = Inputs(
            dirs["model"], quantize, calibration, Path(workspace), params.crosscheck.whole_max_params
        )
        target.write(inputs, out_dir)
        _check_artifact(target, out_dir, quantize)
        sources = {k: {"path": str(dirs[k]), "sha256": _sha256(dirs[k])} for k in ("keep_list", "spectrum")}
        provenance = {"target": name, "scheme": target.scheme, **sources, "quantize": quantize, "keep": keep}
        dump_json(provenance, out_dir / PROVENANCE)
        runtime = target.load(out_dir, inputs)
        try:
            measured = scorer.score(runtime.forward)
        finally:
            runtime.close()
    metric = params.curve.metric
    doc = {
        "target": name,
        "scheme": target.scheme,
        "format": target.format,
        "artifact": {"path": str(out_dir), "bytes": dir_bytes(out_dir), **sources},
        "quantized": len(quantize),
        "kept": keep,
        "runtime": runtime.facts(),
        "runtime_differs": runtime_differs(runtime.quantized, quantize),
        "measured": measured,
        "predicted": predicted,
        "all_int8": all_int8,
        "agreement": {**agreement(metric, measured, predicted), "bar": target.bar, "gap": target.gap},
    }
    log.info(
        "%s: %d of %d ops kept, %.2f MB; %s measured %.6g, predicted %.6g",
        name,
        len(keep),
        len(scored),
        doc["artifact"]["bytes"] / 1e6,
        metric,
        measured[metric],
        predicted[metric],
    )
    return doc


def _predict(
    sens: SensitivityParams, batch_size: int, dirs: dict[str, Path], report: dict[str, Any], keep: list[str]
) -> tuple[dict[str, float], dict[str, float], Scorer, list[Batch]]:
    """The native prediction for ``keep`` and for all-int8 under the target's scheme, the test
    split's scorer and the calibration batches (CPU). The measurer's model is released on return,
    so the artifact is written and loaded without it beside (the larger of the two peaks, not the sum)."""
    with open_measurer(sens, batch_size, dirs["calibration"], dirs["test"], dirs["model"], report, TEST) as m:
        predicted, all_int8 = m.measure(keep), m.measure([])
        calibration = [{k: v.cpu() for k, v in b.items()} for b in m.calibration]
        return predicted, all_int8, m.scorer().cpu(), calibration


def _check_artifact(target: Target, out_dir: Path, quantize: list[str]) -> None:
    """The artifact quantizes exactly ``quantize``, read back from it; else it is removed (a
    runtime that ignores part of the list must not ship as if it had not)."""
    got = target.quantized_in(out_dir)
    if got != set(quantize):
        shutil.rmtree(out_dir)
        raise InputError(
            f"{out_dir}: {target.name} quantizes {sorted(got - set(quantize))[:5]} that the keep-list keeps "
            f"and keeps {sorted(set(quantize) - got)[:5]} that it quantizes (the tool did not apply the "
            "list as written; artifact removed)"
        )


def runtime_differs(loaded: set[str] | None, quantize: list[str]) -> dict[str, Any]:
    """What the loaded runtime quantizes against the list: ``{readable, ignored, added}`` (modules
    the list quantizes that the runtime runs in high precision, and the reverse)."""
    if loaded is None:
        return {"readable": False, "ignored": [], "added": []}
    listed = set(quantize)
    return {"readable": True, "ignored": sorted(listed - loaded), "added": sorted(loaded - listed)}


def agreement(metric: str, measured: dict[str, float], predicted: dict[str, float]) -> dict[str, Any]:
    m, p = measured[metric], predicted[metric]
    return {"metric": metric, "measured": m, "predicted": p, "ratio": m / p if p else None}


def metrics(doc: dict[str, Any]) -> dict[str, Any]:
    """The DVC metrics row, in validate's columns where they mean the same (docs/artifacts.md): the
    all-int8 damage (native, this scheme), the list's damage measured in the runtime (``m_kept``),
    the native prediction for the list (``m_native``), and the artifact's size."""
    a, m = doc["agreement"], doc["agreement"]["metric"]
    return {
        f"{m}_int8": doc["all_int8"][m],
        f"{m}_kept": a["measured"],
        f"{m}_native": a["predicted"],
        "size_mb": round(doc["artifact"]["bytes"] / 1e6, 3),
    }
