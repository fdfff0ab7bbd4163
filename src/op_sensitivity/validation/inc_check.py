"""validate's INC check: INC's own PTQ (``quantization.fit``) of the keep-list against the native
prediction for the same list, on the test split.

Up to ``crosscheck.whole_max_params`` it quantizes the whole model, from the op_name_dict a user
of the export would pass. Above it INC's PTQ of the whole model does not fit a 24 GB machine
(every weight upcast to float32 and copied while it converts), so both sides run on the carved
copy the crosscheck uses (``model.carve``): the keep-list's ops and the ops the pass kept fp32
that the copy has stay in high precision, every other op of the copy is int8, and the native
prediction is measured on the same copy. ``inc_ptq.compared`` says which ran.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ..engines.inc_loop import ptq_logits
from ..model.carve import Carve, load_carved
from ..params import CrosscheckParams, SensitivityParams
from ..report.comparison import whole_model
from .inputs import open_carved_measurer
from .measure import TEST, Measurer
from .validate import compare_with_inc

OpNameDict = Callable[[Iterable[str]], dict[str, Any]]  # fallback.exports.inc_op_name_dict


def whole_check(
    doc: dict[str, Any],
    measurer: Measurer,
    model: nn.Module,
    fp32_ops: list[str],
    op_name_dict: OpNameDict,
    batch_size: int,
    workspace: Path,
    report: dict[str, Any],
    check: CrosscheckParams,
) -> None:
    """INC's PTQ of the whole model (the sensitivity ``report``'s); the native prediction is the
    chosen list's measured values."""
    forward = ptq_logits(model, measurer.calibration, batch_size, op_name_dict(fp32_ops), workspace)
    compared = whole_model(report, check.whole_max_params)
    compare_with_inc(doc, measurer.measure_forward(forward), doc["chosen"]["values"], compared)


def carved_check(
    doc: dict[str, Any],
    keep: list[str],
    op_name_dict: OpNameDict,
    sensitivity: SensitivityParams,
    check: CrosscheckParams,
    batch_size: int,
    dirs: dict[str, Path],
    report: dict[str, Any],
    workspace: Path,
) -> None:
    """INC's PTQ and the native prediction, both on the carved copy. ``dirs``: calibration, test, model.

    When the keep-list and the pass's exclusions leave no op of the copy int8 there is nothing to
    compare (both sides are the fp32 copy): ``inc_ptq`` stays null and ``inc_ptq_note`` says why.
    """
    measurer, carve = open_carved_measurer(
        sensitivity,
        batch_size,
        dirs["calibration"],
        dirs["test"],
        dirs["model"],
        report,
        check.carve_layers,
        check.carve_vision_blocks,
        TEST,
    )
    with measurer:
        keep_c = [m for m in keep if m in measurer.scored]
        int8 = [m for m in measurer.scored if m not in keep_c]
        if not int8:
            doc["inc_ptq_note"] = (
                f"INC check skipped: on {carve.describe()} the keep-list and the ops the pass kept "
                "fp32 leave no op int8"
            )
            return
        native = measurer.measure(keep_c)
        fp32_ops = [*keep_c, *measurer.fq.kept]  # the copy's ops the pass kept fp32 (excluded)
        # a second copy for INC, which casts and converts the model it is given
        model, _ = load_carved(dirs["model"], check.carve_layers, check.carve_vision_blocks, carve.token_ids)
        forward = ptq_logits(model, measurer.calibration, batch_size, op_name_dict(fp32_ops), workspace)
        compare_with_inc(doc, measurer.measure_forward(forward), native, _carved(carve, check, keep_c, int8))
        del model, forward
    gc.collect()


def _carved(carve: Carve, check: CrosscheckParams, keep: list[str], int8: list[str]) -> dict[str, Any]:
    return {
        "model": "carved",
        **carve.as_dict(),
        "whole_max_params": check.whole_max_params,
        "keep_list_ops": keep,  # the keep-list's ops the copy has
        "int8_ops": len(int8),
    }
