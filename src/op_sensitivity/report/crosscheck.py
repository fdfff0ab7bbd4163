"""The crosscheck stage's work: rerun the pass with the other engine on the same inputs, compare.

The comparison itself (and the ``crosscheck.json`` schema) is ``report.comparison``; the rerun's
seconds go to a runtime file (``engines.runner.runtime_doc``), never into ``crosscheck.json``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..atomic import dump_json
from ..engines.artifact import build_report, read_report, scheme_name
from ..engines.runner import load_inputs, run_engine, run_fingerprint, runtime_doc
from ..errors import InputError
from ..params import SensitivityParams
from ..phases import REQUANT
from .comparison import crosscheck


def run_crosscheck(
    params: SensitivityParams,
    cal_dir: Path,
    model_dir: Path,
    inventory_path: Path,
    report_path: Path,
    out_path: Path,
    runtime_path: Path | None,
    workspace: Path,
) -> dict[str, Any]:
    """Run the engine the report was not made with on the same inputs and compare (native vs INC).

    The native engine is always the candidate and INC the reference; the native run uses
    ``requant_mode: cumulative`` here, whatever params say, so the two curves are comparable.
    INC computes one scheme, inc_cpu: a report measured under another scheme has no INC
    reference, so then both engines run under inc_cpu (``checked_scheme`` says which was checked).
    """
    stored = read_report(report_path)
    if stored["engine"] == "native" and stored["phases"][REQUANT].get("cumulative") is False:
        raise InputError(f"{report_path}: made with requant_mode isolated; crosscheck needs cumulative")
    params = replace(params, native=replace(params.native, requant_mode="cumulative"))
    if scheme_name(stored) != "inc_cpu":
        params = replace(params, engine="native", native=replace(params.native, scheme="inc_cpu"))
        model, spec, inventory, metadata = load_inputs(params, cal_dir, model_dir, inventory_path)
        run = run_engine("native", model, spec, workspace / "native", run_fingerprint(params, metadata))
        stored = build_report(run, inventory, metadata)
    other = "native" if stored["engine"] == "inc" else "inc"
    model, spec, inventory, metadata = load_inputs(params, cal_dir, model_dir, inventory_path)
    result = run_engine(other, model, spec, workspace, run_fingerprint(params, metadata))
    fresh = build_report(result, inventory, metadata)
    native, inc = (fresh, stored) if other == "native" else (stored, fresh)
    doc = crosscheck(native, inc)
    doc["checked_scheme"] = "inc_cpu"
    doc["candidate"]["arithmetic"] = native["metadata"].get("engine_details", {}).get("arithmetic")
    dump_json(doc, out_path)
    if runtime_path is not None:
        dump_json(runtime_doc(result), runtime_path)
    return doc
