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
    served: bool                whether that runtime is one that serves the artifact; false: the
                                figure is a round trip of the export, and round_trip says why and
                                what would serve it (ModelOpt's checkpoints: a GPU runtime)
    round_trip: str | null
    measured, predicted, all_int8: {kl, top1, nll, logit_se, ...}   test split, against fp32
    agreement: {metric, measured, predicted, ratio, bar, floor, causes, [bound], derivation, gap}
                                bar: the relative tolerance this run derived (``quantize.causes``):
                                the target's floor plus the bound of the causes measured on the run
                                ({name, value, how} each); gap: what its runtime computes differently

Metrics (``reports/deploy/<target>.json``, DVC; ``m`` = ``curve.metric``): ``m_int8``, ``m_kept``
(measured in the runtime), ``m_native`` (the native prediction), ``size_mb``.

Inputs are checked before anything is written, as validate checks them: the spectrum was measured
under the target's scheme, the keep-list was chosen under it, and every entry names an op the
spectrum scored (a hand-edited ``lm_headx`` would otherwise be dropped and ``lm_head`` quantized).

Commit: the artifact (with ``op_sensitivity_source.json``), its measurement, the document and the
metrics are all built in one staging directory beside the artifact (``atomic.staging``: a hidden
``.<target>.tmp-<pid>-*`` sibling, which also holds the tools' scratch and ``$TMPDIR``), then
renamed into place together at the end (``atomic.commit``): document, metrics, artifact last.
An error, Ctrl-C or SIGTERM before that leaves the previous set untouched; one during the renames
is held until they are done. A SIGKILL inside the renames (three ``rename(2)`` calls) can leave
the new document and metrics beside the previous artifact, each file whole; the artifact in place
always carries its own ``op_sensitivity_source.json``, whose ``keep_list`` / ``spectrum`` digests
say which lists it was built from, and ``dvc repro`` reruns the stage (its lock was not updated).
A killed run's staging directory is removed by the next run of the same target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import check_writable, commit, private_tmp, staging
from ..cli import raise_if_terminated
from ..engines.artifact import scheme_name
from ..engines.contract import check_scored
from ..errors import InputError
from ..fallback.keep_list import check_keep_list_ops
from ..inventory import OpInfo
from ..model.source import load_model_dir
from ..params import FUSED_TARGETS, MAIN_PASS_TARGETS, TARGET_SCHEMES, Params, SensitivityParams
from ..validation.inputs import open_measurer, scored_and_excluded
from ..validation.measure import TEST, Scorer
from .base import Batch, Inputs, Runtime, Target, dir_bytes
from .causes import Cause, derived_bar
from .hf_checkpoint import logits_of

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


def check_sources(
    target: Target, keep_list: dict[str, Any], report: dict[str, Any], dirs: dict[str, Path]
) -> None:
    """The spectrum was measured under the target's scheme, the keep-list chosen under it, and every
    entry of the list is an op the spectrum scored (``fallback.keep_list.check_keep_list_ops``, as
    validate checks it): one line naming the file and the entry, before anything is written."""
    measured = scheme_name(report)
    if measured != target.scheme:
        raise InputError(
            f"{dirs['spectrum']}: measured under scheme {measured!r}, expected {target.scheme!r} "
            f"(quantize target {target.name} deploys the {target.scheme} keep-list)"
        )
    chosen = keep_list.get("scheme")
    if chosen is not None and chosen != target.scheme:
        raise InputError(
            f"{dirs['keep_list']}: chosen under scheme {chosen!r}, expected {target.scheme!r} "
            f"(quantize target {target.name}; rerun the fallback_list stage)"
        )
    scored, _ = scored_and_excluded(report)
    check_keep_list_ops(keep_list, dirs["keep_list"], scored, dirs["spectrum"])


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"  # atomic.dump_json's layout


def quantize_target(
    name: str,
    params: Params,
    dirs: dict[str, Path],
    keep_list: dict[str, Any],
    report: dict[str, Any],
    inventory: list[OpInfo],
    out_dir: Path,
    doc_path: Path | None = None,
    metrics_path: Path | None = None,
    stage: Path | None = None,
) -> dict[str, Any]:
    """Write the target's artifact to ``out_dir`` and measure it; the document (module doc).
    ``dirs``: model, calibration, test, keep_list, spectrum (paths). The tool, the sources and
    the list are checked before anything is written; an artifact that does not quantize exactly
    the list's complement is removed and refused.

    ``doc_path`` / ``metrics_path``: the document and the DVC metrics, committed with the artifact
    (module doc, Commit). ``stage``: the staging directory beside ``out_dir`` to build in
    (``atomic.staging``; the stage script opens it before its imports, so that what they write to
    ``$TMPDIR`` lands there); None: one is opened here."""
    from .targets import target as make_target  # the tools: imported only when a target runs

    target = make_target(name)
    target.require()
    quantize = to_quantize(keep_list, report, inventory, name in FUSED_TARGETS)
    check_sources(target, keep_list, report, dirs)
    if not quantize:
        raise InputError(
            f"{dirs['keep_list']}: keeps every op of the {target.scheme} pass (nothing to quantize)"
        )
    scored, _ = scored_and_excluded(report)
    check_scored(params.sensitivity, len(scored))
    outputs = [(p, "file") for p in (doc_path, metrics_path) if p is not None]
    for path, kind in [*outputs, (out_dir, "dir")]:  # a path in the way fails now, not after the build
        check_writable(path, kind)
    sens = replace(params.sensitivity, native=replace(params.sensitivity.native, scheme=target.scheme))
    keep = [m for m in scored if m not in set(quantize)]
    sources = {k: {"path": str(dirs[k]), "sha256": _sha256(dirs[k])} for k in ("keep_list", "spectrum")}
    with contextlib.ExitStack() as stack:
        if stage is None:
            stage = stack.enter_context(staging(out_dir))
        stack.enter_context(private_tmp(stage / "tmp"))
        predicted, all_int8, scorer, calibration = _predict(sens, params.curve.batch_size, dirs, report, keep)
        built, work = stage / "artifact", stage / "work"
        work.mkdir()
        inputs = Inputs(dirs["model"], quantize, calibration, work, params.crosscheck.whole_max_params)
        target.write(inputs, built)
        _check_artifact(target, built, quantize)
        metric = params.curve.metric
        stored, causes = stored_dtype_causes(target, dirs["model"], sens.native.dtype, scorer, metric)
        provenance = {"target": name, "scheme": target.scheme, **sources, "quantize": quantize, "keep": keep}
        (built / PROVENANCE).write_text(_json_text(provenance))
        runtime, measured, own = measure_artifact(target, built, inputs, scorer, metric)
        doc = _document(name, target, out_dir, dir_bytes(built), sources, quantize, keep, runtime)
        doc.update(measured=measured, predicted=predicted, all_int8=all_int8)
        check_runtime_dtype(target, runtime, stored)
        causes += own
        doc["agreement"] = {
            **agreement(metric, measured, predicted),
            **derived_bar(metric, target.bar, predicted[metric], causes),
            "gap": target.gap_here(),
        }
        pairs = []
        for file, path, content in (("document.json", doc_path, doc), ("metrics.json", metrics_path, None)):
            if path is not None:
                (stage / file).write_text(_json_text(metrics(doc) if content is None else content))
                pairs.append((stage / file, path))
        raise_if_terminated()  # a stop a library swallowed: nothing is committed
        commit([*pairs, (built, out_dir)])  # the artifact last: what a user deploys describes itself
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


def _document(
    name: str,
    target: Target,
    out_dir: Path,
    size: int,
    sources: dict[str, Any],
    quantize: list[str],
    keep: list[str],
    runtime: Runtime,
) -> dict[str, Any]:
    """The document's head, in its key order (module doc); the measurements follow."""
    return {
        "target": name,
        "scheme": target.scheme,
        "format": target.format,
        "artifact": {"path": str(out_dir), "bytes": size, **sources},
        "quantized": len(quantize),
        "kept": keep,
        "runtime": runtime.facts(),
        "served": target.round_trip is None,
        "round_trip": target.round_trip,
        "runtime_differs": runtime_differs(runtime.quantized, quantize),
    }


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


def stored_dtype_causes(
    target: Target, model_dir: Path, predicted_in: str, scorer: Scorer, metric: str
) -> tuple[str | None, list[Cause]]:
    """The stored dtype as a cause (``quantize.causes``): a target whose runtime computes in the
    model's stored dtype (a published bf16 snapshot runs in bf16) where the prediction computes in
    ``predicted_in`` (``sensitivity.native.dtype``) is off by what that dtype does alone, measured
    here: the float model as stored, scored on the test split against the float32 reference.
    Measured before the runtime loads, so the two models are never held together (at 3B: 7.5 GB
    each in bf16). Returns the dtype the runtime must compute in (None: a target that computes in
    float32 whatever is stored) and the causes (none where the model is stored in ``predicted_in``)."""
    if not target.runs_stored_dtype:
        return None, []
    model, _, _ = load_model_dir(model_dir)
    try:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if dtype == predicted_in:
            return dtype, []
        forward = logits_of(model)
        with torch.no_grad():
            value = scorer.score(lambda batch: forward(batch).float())[metric]
    finally:
        del model
    how = f"the float model as stored ({dtype}, nothing quantized) against the float32 reference, test split"
    return dtype, [Cause(f"stored dtype {dtype}", value, how)]


def check_runtime_dtype(target: Target, runtime: Runtime, expected: str | None) -> None:
    """The runtime computes in the dtype the stored-dtype cause was measured for (read off the
    loaded model); None: nothing to check."""
    if expected is not None and runtime.dtype != expected:
        raise RuntimeError(
            f"{target.name}: the runtime computes in {runtime.dtype}, the stored dtype's cause was measured "
            f"for {expected}: the bar would not follow from what ran"
        )


def measure_artifact(
    target: Target, built: Path, inputs: Inputs, scorer: Scorer, metric: str
) -> tuple[Runtime, dict[str, float], list[Cause]]:
    """The artifact loaded by its runtime and scored on the test split, and the causes of its gap
    the runtime measures (``Runtime.causes``); the runtime is closed (its facts stay readable).
    The last step before the commit: a stop here leaves the previous set."""
    runtime = target.load(built, inputs)
    try:
        measured = scorer.score(runtime.forward)
        return runtime, measured, runtime.causes(scorer, metric)
    finally:
        runtime.close()


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
