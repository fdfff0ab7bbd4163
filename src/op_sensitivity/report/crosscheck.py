"""The crosscheck stage's work: INC and the native engine on the same inputs, compared.

Two ways, chosen by the model's size (``crosscheck.whole_max_params``) or by
``crosscheck.scope: carved``:

* **whole** (up to the bound): the engine the report was not made with reruns the pass on the
  whole model, and its values are compared with the report's;
* **carved** (above it, or asked for): INC's per-op loop cannot finish on the whole model (at 3B width ~45 s
  per op on 2 cores and 50-75 GB), so both engines run on a copy carved from the same weights
  (``model.carve``: the first decoder layers and vision blocks, real widths, the same
  calibration batches) and score every op of the copy. Equivalence is a property of the
  arithmetic per op type and width, which the copy has; the report's own values are not
  compared (they are the full model's). The embedded default asks for it: its one-layer copy
  holds every op kind and costs INC half the ops.

``crosscheck.batches`` compares the first that-many confidence batches only: INC's loop costs a
model copy per op and batch, so one batch halves the default's check. Where the whole-model check
then covers fewer batches than the report, the native engine reruns on those (``native_rerun``).

Both engines are compared in INC's own numerics, scheme inc_cpu with the cumulative requant
curve, whatever ``sensitivity.native.scheme`` / ``requant_mode`` say: where the report was measured
otherwise (another scheme, or ``requant_mode: isolated``, whose requant values are not INC's
quantity), the native engine reruns the pass that way on the whole model and that run is the
candidate, not the report (``native_rerun`` says why; ``checked_scheme``, ``checked_requant_mode``).

``crosscheck.json`` says which (``compared``). The comparison itself (and the rest of the
schema) is ``report.comparison``; seconds go to a runtime file (``engines.runner.runtime_file``),
never into ``crosscheck.json``.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import dump_json
from ..engines.artifact import build_report, read_report, scheme_name
from ..engines.contract import check_op_dicts
from ..engines.runner import (
    load_carved_inputs,
    load_inputs,
    run_engine,
    run_fingerprint,
    runtime_doc,
    runtime_file,
)
from ..inventory import read_inventory
from ..model.source import read_card
from ..params import CrosscheckParams, SensitivityParams
from ..phases import REQUANT
from .comparison import crosscheck, whole_model

UNBOUNDED_OPS = 1 << 30  # the carved copy scores all its ops, whatever the full pass's max_ops


def run_crosscheck(
    params: SensitivityParams,
    check: CrosscheckParams,
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
    report_path: Path,
    out_path: Path,
    runtime_path: Path | None,
    workspace: Path,
) -> dict[str, Any]:
    """INC against the native engine, whole or carved (module doc); the native one is the candidate.

    The native run uses ``requant_mode: cumulative`` here, whatever params say, so the two curves
    are comparable (INC's requant phase is cumulative). INC computes one scheme, inc_cpu: a report
    measured under another scheme, or with ``requant_mode: isolated``, has no INC reference, so the
    native engine then reruns under inc_cpu, cumulative (``native_rerun``, ``checked_scheme``).
    """
    check_op_dicts(params, read_inventory(inventory_path), inventory_path)  # before any work
    stored = read_report(report_path)
    params = replace(params, native=replace(params.native, requant_mode="cumulative"))  # INC's mode
    batches = check.checked_batches(params.confidence_batches)
    cut = batches < params.confidence_batches
    params = replace(params, confidence_batches=batches)
    card = read_card(model_dir)
    if check.carves_crosscheck(card.params):
        doc, runtime = _carved(params, check, cal_dir, model_dir, workspace)
        doc["native_rerun"] = None
    else:
        doc, runtime = _whole(params, stored, cal_dir, model_dir, inventory_path, workspace, cut)
        doc["compared"] = whole_model(stored, check.whole_max_params)
    doc["checked_scheme"] = "inc_cpu"
    doc["checked_requant_mode"] = "cumulative"
    dump_json(doc, out_path)
    if runtime_path is not None:
        dump_json(runtime_file(runtime), runtime_path)
    return doc


def _whole(
    params: SensitivityParams,
    stored: dict[str, Any],
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
    workspace: Path,
    cut: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The other engine on the whole model, against the stored report (or a native rerun in INC's
    numerics, :func:`native_rerun`; ``cut``: on fewer batches than the report's)."""
    rerun = native_rerun(stored)
    if rerun is None and cut:
        rerun = (
            f"crosscheck.batches compares the first {params.confidence_batches} confidence batches of "
            f"the report's {stored['metadata']['calibration']['confidence_batches']}, so the native "
            "engine reran the pass on those and that run was compared"
        )
    if rerun is not None:
        params = replace(inc_numerics(params), engine="native")
        model, spec, inventory, metadata = load_inputs(params, cal_dir, model_dir, inventory_path)
        run = run_engine("native", model, spec, workspace / "native", run_fingerprint(params, metadata))
        stored = build_report(run, inventory, metadata)
    other = "native" if stored["engine"] == "inc" else "inc"
    model, spec, inventory, metadata = load_inputs(params, cal_dir, model_dir, inventory_path)
    result = run_engine(other, model, spec, workspace, run_fingerprint(params, metadata))
    fresh = build_report(result, inventory, metadata)
    native, inc = (fresh, stored) if other == "native" else (stored, fresh)
    doc = crosscheck(native, inc)
    doc["candidate"]["arithmetic"] = native["metadata"].get("engine_details", {}).get("arithmetic")
    doc["native_rerun"] = rerun
    return doc, [{**runtime_doc(result, metadata["model"]["params"]), "model": "whole"}]


def native_rerun(stored: dict[str, Any]) -> str | None:
    """Why the report's own values cannot be compared with INC's (None: they can): the native engine
    then reruns the pass in INC's numerics, scheme inc_cpu, requant cumulative."""
    scheme = scheme_name(stored)
    if scheme != "inc_cpu":
        return (
            f"the report was measured under scheme {scheme}; INC computes inc_cpu only, so the native "
            "engine reran the pass under inc_cpu (requant cumulative) and that run was compared"
        )
    if "screening" in stored["metadata"]:
        return (
            f"the report was screened in {stored['metadata']['screening']['precision']} (float32 only "
            "where the ranking is decided), so the native engine reran the pass in float32 and that run "
            "was compared"
        )
    if stored["engine"] == "native" and stored["phases"][REQUANT].get("cumulative") is False:
        return (
            "the report was measured with sensitivity.native.requant_mode isolated; INC's requant phase "
            "is cumulative, so the native engine reran the pass cumulative and that run was compared"
        )
    return None


def carved_pass(params: SensitivityParams) -> SensitivityParams:
    """The pass both engines run on the carved copy: every op of it scored (the full pass's
    op_name_dict names the full model's ops and may leave none of the copy's), under inc_cpu,
    requant cumulative; the rest (batches, numerics) as the full pass."""
    return replace(inc_numerics(params), op_name_dict={}, op_type_dict={}, max_ops=UNBOUNDED_OPS)


def inc_numerics(params: SensitivityParams) -> SensitivityParams:
    """The native engine's settings for a comparison with INC: scheme inc_cpu, requant cumulative,
    float32 throughout (no screening: INC has none).
    A kernel asked for another scheme (``fp8_kernels``; ``int8_kernels`` on a GPU) need not run
    under inc_cpu, so the arithmetic then becomes ``auto`` (inc_cpu's own: torch's quantized
    modules on CPU in float32): never an error after the main pass has run."""
    native = params.native
    if native.scheme != "inc_cpu":
        native = replace(native, scheme="inc_cpu", arithmetic="auto")
    native = replace(native, requant_mode="cumulative", screening="none", exact_budget=None)
    return replace(params, native=native)  # exact_budget caps a screened pass only: none measures all


def _carved(
    params: SensitivityParams, check: CrosscheckParams, cal_dir: Path, model_dir: Path, workspace: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Both engines on the carved copy (:func:`carved_pass`): one INC pass of a few dozen ops."""
    params = carved_pass(params)
    reports, runtimes = {}, {}
    for engine in ("native", "inc"):  # each on its own load: INC casts and hooks the model it gets
        model, spec, inventory, metadata, carve = load_carved_inputs(
            params, cal_dir, model_dir, check.carve_layers, check.carve_vision_blocks
        )
        result = run_engine(engine, model, spec, workspace / engine, run_fingerprint(params, metadata))
        reports[engine] = build_report(result, inventory, metadata)
        runtimes[engine] = runtime_doc(result, carve.params)
        del model, result
        gc.collect()
    # model_sha256: the weights carved from; every op of the copy is scored
    compared = {"model": "carved", **carve.as_dict(), "whole_max_params": check.whole_max_params}
    doc = crosscheck(reports["native"], reports["inc"], compared=compared)
    doc["candidate"]["arithmetic"] = reports["native"]["metadata"]["engine_details"]["arithmetic"]
    return doc, [{**runtimes[engine], "model": "carved"} for engine in ("native", "inc")]
