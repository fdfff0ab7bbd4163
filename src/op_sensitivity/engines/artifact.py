"""Schema of ``op_sensitivity.json`` (the sensitivity stage's artifact): build, write, read, validate.

Document (``schema_version`` 1)::

    schema_version: 1
    engine: "inc" | "native"
    metadata:
      versions: {neural_compressor, torch, transformers, python}
      model: ModelCard fields (source, origin, random_weights, seed, sha256, params, model_type)
      calibration: {mode, manifest_records, samples_used, batch_size, confidence_batches, annotations}
      measured_at: INC op name whose output the error is measured at (lm_head: the logits)
      measure, aggregation: how to read the numbers
      excluded_ops: [{op_name, op_type, reason}]    ops kept fp32, never scored
      conv3d_handling: str
      quantization: {approach, reduce_range, by_op_type: {Linear: {weight: {...}, activation: {...}}, ...}}
                    (a scheme other than inc_cpu: {scheme, by_op_type: {Linear: {weight, input, output}}})
      scheme: {name, library, weights, inputs, outputs, op_types, skip, source, notes}
                    the deployment scheme measured (op_sensitivity.schemes; inc_cpu for engine inc)
      requant_mode: "cumulative" | "isolated" (native only)
      all_int8_mse: float           native engine: the all-int8 error, measured directly
      engine_details: {...}         native engine: device, dtype, allow_tf32, arithmetic
      screening: {precision, exact_top, margin, margin_used, noise: [{fp32, int8}], refined: {phase: [op]},
                  observed_ratio, check: {ops: {phase: [op]}, trials, observed_ratio},
                  widened: [{from, to, by}]}
                                    native screening only (engines.screening): refined, the ops the top
                                    exact_top of fallback, requant and both needed in float32; check, a
                                    seeded sample of the others measured in float32 to test the bound's
                                    assumption (observed_ratio: the largest share of the unscaled bound a
                                    trial used; null: nothing left to sample); widened, every margin
                                    widening and what showed it (refined | sample). Each op then has
                                    ``precision``: float32 (refined or checked) or the screen's.
                  first_order adds audit: {phase: {ops, measured, spearman, recall, found, escape}},
                  estimate: {points, probes, per_batch: [{points, curve, residual, forwards,
                  backwards}]} and bound: {phase: [per batch]} (engines.first_order,
                  engines.screening.audit_record); its ops' precision is exact or estimated.
                  With exact_budget set: budget: {exact_budget, unsettled: {phase: [op]}}, the
                  trials the selection still needed when a phase reached the budget (that phase's
                  top, and both's, may then not be the exact order)
    phases:
      fallback | requant:
        semantics: str; direction: str; cumulative: bool
        ops: [OpScore]          in config (module) order
        double_check: [{batch, ops: [{op_name, op_type, mse}]}]    fallback only, INC's second pass

OpScore: op_name (INC name), module (model module path), op_type, tower, position (1-based config
order = quantization order in requant), mse (mean over confidence batches of INC's raw value: a
*sum* of squared differences at the logits), mse_per_batch, rank (1 = lowest mean mse, ties by
position; this is the order INC itself returns).

Reading direction: fallback - LOW mse = MORE sensitive (with only this op back in fp32 the error
left is smallest, so this op carried the most of it). requant - values are CUMULATIVE; the per-op
effect is the increment over the previous position, not the value itself.

The document is a function of the pass's inputs only: the same params, calibration sample,
model and software give the same bytes. Seconds and peak memory go to the runtime file
(``engines.runner.RUNTIME_DOC``), which no stage hashes or reads.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..atomic import dump_json, read_json
from ..errors import InputError
from ..inventory import OpInfo, module_name
from ..phases import FALLBACK, PHASES, REQUANT
from .contract import HelperCall, OpKey, PassResult

SCHEMA_VERSION = 1
FALLBACK_SEMANTICS = (
    "Each value: every other scored op int8, only this op fp32; sum of squared differences of the last op's "
    "output (logits) against the fp32 model. LOW value = keeping this op in fp32 removes the most error = "
    "the op is MORE sensitive. rank 1 = most sensitive."
)
REQUANT_SEMANTICS = (
    "CUMULATIVE, not per-op: starting from all ops fp32, INC quantizes the ops one after another in position "
    "order and never reverts; each value is the error with this op and all earlier positions int8. The "
    "per-op effect is the increment over the previous position. rank orders the cumulative values "
    "(INC's own return order), which is NOT a sensitivity ranking."
)
REQUANT_ISOLATED_SEMANTICS = (
    "ISOLATED (native engine): only this op int8, every other op fp32; sum of squared differences of the "
    "last op's output against fp32. HIGH value = the op is MORE sensitive. A true per-op measure INC lacks."
)
MEASURE = "sum (not mean) of squared differences at the measured op's output vs fp32, per confidence batch"
AGGREGATION = "mse = mean over confidence batches of the raw per-batch values (mse_per_batch)"


@dataclass(frozen=True)
class OpScore:
    op_name: str
    module: str
    op_type: str
    tower: str
    position: int
    mse: float
    mse_per_batch: list[float]
    rank: int


def _phase_scores(
    calls: list[HelperCall], order: list[OpKey], excluded: set[str], towers: dict[str, str]
) -> list[OpScore]:
    per_batch: dict[tuple[str, str], list[float]] = {}
    for call in calls:
        for key, value in call.main:
            if key[0] not in excluded:
                per_batch.setdefault(key, []).append(value)
    incomplete = [k for k, v in per_batch.items() if len(v) != len(calls)]
    if incomplete:
        raise InputError(f"the engine scored ops in some confidence batches only: {incomplete[:5]}")
    position = {k: i + 1 for i, k in enumerate(order)}
    keys = sorted(per_batch, key=lambda k: position[k])
    means = {k: sum(per_batch[k]) / len(per_batch[k]) for k in keys}
    ranked = sorted(keys, key=lambda k: (means[k], position[k]))
    rank = {k: i + 1 for i, k in enumerate(ranked)}
    return [
        OpScore(
            k[0],
            module_name(k[0]),
            k[1],
            towers.get(module_name(k[0]), "text"),
            position[k],
            means[k],
            per_batch[k],
            rank[k],
        )
        for k in keys
    ]


def build_report(result: PassResult, inventory: list[OpInfo], metadata: dict[str, Any]) -> dict[str, Any]:
    """Assemble the artifact from an engine's raw values; refuse an empty phase."""
    towers = {op.name: op.tower for op in inventory}
    excluded = {e.op_name for e in result.excluded}
    phases = {}
    isolated = result.requant_mode == "isolated"
    for phase, semantics, direction in (
        (FALLBACK, FALLBACK_SEMANTICS, "lower_is_more_sensitive"),
        (
            REQUANT,
            REQUANT_ISOLATED_SEMANTICS if isolated else REQUANT_SEMANTICS,
            "higher_is_more_sensitive" if isolated else "cumulative_increasing",
        ),
    ):
        calls = result.capture.phase(phase)
        ops = _phase_scores(calls, result.op_order, excluded, towers)
        if not ops:
            raise InputError(f"{result.engine} {phase} phase scored no op: refusing to write an empty report")
        rows = [asdict(o) for o in ops]
        if result.screening is not None:
            checked = result.screening.get("check", {}).get("ops", {})
            audited = result.screening.get("audit", {}).get(phase, {}).get("measured", [])
            exact = {*result.screening["refined"][phase], *checked.get(phase, []), *audited}
            if result.screening["precision"] == "first_order":
                words = ("exact", "estimated")
            else:
                words = ("float32", result.screening["precision"])
            for row in rows:
                row["precision"] = words[0] if row["op_name"] in exact else words[1]
        phases[phase] = {
            "semantics": semantics,
            "direction": direction,
            "cumulative": phase == REQUANT and not isolated,
            "ops": rows,
        }
    phases[FALLBACK]["double_check"] = [
        {"batch": c.batch, "ops": [{"op_name": k[0], "op_type": k[1], "mse": v} for k, v in c.double_check]}
        for c in result.capture.phase(FALLBACK)
        if c.double_check
    ]
    meta = {
        "versions": _versions(),
        **metadata,
        "measured_at": result.measured_at,
        "measure": MEASURE,
        "aggregation": AGGREGATION,
        "excluded_ops": [asdict(e) for e in result.excluded],
        "conv3d_handling": result.conv3d_handling,
        "quantization": result.quantization,
        "scheme": asdict(result.scheme),
        "requant_mode": result.requant_mode,
        **({"all_int8_mse": result.all_int8_mse} if result.all_int8_mse is not None else {}),
        **({"engine_details": result.details} if result.details else {}),
        **({"screening": result.screening} if result.screening is not None else {}),
    }
    return {"schema_version": SCHEMA_VERSION, "engine": result.engine, "metadata": meta, "phases": phases}


def _versions() -> dict[str, str]:
    import neural_compressor
    import torch
    import transformers

    return {
        "neural_compressor": neural_compressor.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def all_int8_error(report: dict[str, Any]) -> float:
    """E: measured directly when the engine did (native), else the requant curve's last point."""
    if "all_int8_mse" in report["metadata"]:
        return float(report["metadata"]["all_int8_mse"])
    ops = sorted(report["phases"][REQUANT]["ops"], key=lambda o: o["position"])
    return float(ops[-1]["mse"])


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The pass's headline numbers for ``dvc metrics``: ops scored and the all-int8 error (the
    same two keys in every scheme's file, so ``dvc metrics show`` puts them in one column each)."""
    return {"ops": len(report["phases"][FALLBACK]["ops"]), "int8_mse": all_int8_error(report)}


def write_report(report: dict[str, Any], path: Path, metrics_path: Path) -> None:
    validate(report, str(path))
    dump_json(report, path)
    dump_json(metrics(report), metrics_path)


_OP_FIELDS = {
    "op_name": str,
    "module": str,
    "op_type": str,
    "tower": str,
    "position": int,
    "mse": float,
    "mse_per_batch": list,
    "rank": int,
}


def _kind(value: Any, kind: type) -> bool:
    """``value`` is a ``kind`` (an int counts as a float; a bool is neither int nor float)."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _finite(value: Any) -> bool:
    return _kind(value, float) and math.isfinite(value)


def validate(doc: Any, where: str) -> dict[str, Any]:
    """Check the schema, at every level a consumer reads, and that every value is a finite float;
    raise InputError naming the field. Never crashes on a wrong type: each level is checked
    before the next is read."""

    def fail(msg: str) -> None:
        raise InputError(f"{where}: {msg}")

    def need(cond: bool, field: str, expected: str, value: Any) -> None:
        if not cond:
            fail(f"{field}: expected {expected}, got {value!r}")

    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        fail(f"expected an op sensitivity report with schema_version {SCHEMA_VERSION}")
    for key in ("engine", "metadata", "phases"):
        if key not in doc:
            fail(f"field '{key}' missing")
    need(isinstance(doc["engine"], str), "engine", "a string", doc["engine"])
    _validate_metadata(doc["metadata"], fail, need)
    phases = doc["phases"]
    need(isinstance(phases, dict), "phases", f"an object with {' and '.join(PHASES)}", phases)
    for phase in PHASES:
        ph = phases.get(phase)
        if not isinstance(ph, dict) or not isinstance(ph.get("ops"), list) or not ph["ops"]:
            fail(f"phases.{phase}.ops: expected a non-empty list")
        if "cumulative" in ph:
            need(
                isinstance(ph["cumulative"], bool),
                f"phases.{phase}.cumulative",
                "true/false",
                ph["cumulative"],
            )
        for i, op in enumerate(ph["ops"]):
            need(isinstance(op, dict), f"phases.{phase}.ops[{i}]", "an object", op)
            for name, kind in _OP_FIELDS.items():
                value = op.get(name)
                if not _kind(value, kind):
                    fail(f"phases.{phase}.ops[{i}].{name}: expected {kind.__name__}, got {value!r}")
            if not all(_finite(v) for v in [op["mse"], *op["mse_per_batch"]]):
                fail(f"phases.{phase}.ops[{i}] ({op['op_name']}): mse values must be finite numbers")
    return doc


def _validate_metadata(meta: Any, fail: Callable[[str], None], need: Callable[..., None]) -> None:
    """The metadata fields the stages read: excluded_ops, the model's hash and size, where the error
    is measured, and the optional scheme, engine details and all-int8 error."""
    need(isinstance(meta, dict), "metadata", "an object", meta)
    for key in ("excluded_ops", "model", "measured_at"):
        if key not in meta:
            fail(f"metadata.{key}: missing")
    excluded = meta["excluded_ops"]
    need(isinstance(excluded, list), "metadata.excluded_ops", "a list", excluded)
    for i, e in enumerate(excluded):
        ok = isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("op_name", "op_type", "reason"))
        need(ok, f"metadata.excluded_ops[{i}]", "an object with string op_name, op_type and reason", e)
    model = meta["model"]
    need(isinstance(model, dict), "metadata.model", "an object (the model card)", model)
    for key, kind in (("sha256", str), ("origin", str), ("params", int)):
        need(_kind(model.get(key), kind), f"metadata.model.{key}", kind.__name__, model.get(key))
    need(isinstance(meta["measured_at"], str), "metadata.measured_at", "a string", meta["measured_at"])
    if "scheme" in meta:
        scheme = meta["scheme"]
        ok = isinstance(scheme, dict) and isinstance(scheme.get("name"), str)
        need(ok, "metadata.scheme", "an object with a string name", scheme)
    if "engine_details" in meta:
        need(
            isinstance(meta["engine_details"], dict),
            "metadata.engine_details",
            "an object",
            meta["engine_details"],
        )
    if "screening" in meta:
        screening = meta["screening"]
        ok = isinstance(screening, dict) and isinstance(screening.get("refined"), dict)
        need(ok, "metadata.screening", "an object with the refined ops per phase", screening)
        check = screening.get("check", {"ops": {}})
        ok = isinstance(check, dict) and isinstance(check.get("ops"), dict)
        need(ok, "metadata.screening.check", "an object with the checked ops per phase", check)
    if "all_int8_mse" in meta:
        need(_finite(meta["all_int8_mse"]), "metadata.all_int8_mse", "a finite number", meta["all_int8_mse"])
    if "requant_mode" in meta:
        ok = meta["requant_mode"] in ("cumulative", "isolated")
        need(ok, "metadata.requant_mode", "cumulative or isolated", meta["requant_mode"])


def scheme_name(report: dict[str, Any]) -> str:
    """The scheme a report was measured under (reports from before schemes existed: inc_cpu)."""
    return report["metadata"].get("scheme", {}).get("name", "inc_cpu")


def read_report(path: Path) -> dict[str, Any]:
    doc = read_json(path, "sensitivity report", "sensitivity")
    return validate(doc, str(path))
