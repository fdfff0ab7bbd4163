"""The plan's memory estimates, checked against what they were not fitted to: properties every
estimate must have (more scored ops never cost less; a larger model costs more, a target in
proportion to the weights it stores), and the quantize targets' figures against the recorded 3B
benchmark files themselves (benchmarks/results/quantize-3b-*-cpu-*.json, read here, not copied)."""

from __future__ import annotations

import json

import pytest

from op_sensitivity.plan.model import describe
from op_sensitivity.plan.stages import native_peak_gib, target_gib
from tests.helpers import REPO
from tests.plan.test_stages import _full_size

RESULTS = REPO / "benchmarks/results"


@pytest.fixture(scope="module")
def facts():
    return {size: describe(_full_size(size).model) for size in ("3b", "7b")}


def test_native_peak_grows_with_the_scored_ops_and_the_model(facts):
    f3 = facts["3b"]
    names = [op.name for op in f3.ops]
    peaks = [native_peak_gib(f3, names[:n]) for n in range(0, len(names) + 1, 25)]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]  # more ops scored never cost less
    every3 = native_peak_gib(f3, names)
    assert every3 >= native_peak_gib(f3, names[:-1])
    assert native_peak_gib(f3, names, "ort_qdq") >= every3  # a scheme dequantizes per call: more
    f7 = facts["7b"]
    assert native_peak_gib(f7, [op.name for op in f7.ops]) > every3
    assert f7.stored_bytes > f3.stored_bytes > 0


def _measured_peak(target: str) -> float:
    (path,) = sorted(RESULTS.glob(f"quantize-3b-{target}-cpu-*.json"))[-1:]
    doc = json.loads(path.read_text())
    assert doc["size"] == "3b" and doc["target"] == target
    return max(v["peak_rss_gib"] for v in doc.values() if isinstance(v, dict) and "peak_rss_gib" in v)


@pytest.mark.parametrize("target", ["compressed_tensors", "modelopt_int8", "modelopt_fp8"])
def test_target_estimates_cover_the_recorded_3b_peak_and_scale_with_the_weights(facts, target):
    """Within [measured, measured + 15 %] of the benchmark file's peak RSS (the plan must not
    promise less than was measured, nor stop a run for much more), and proportional to the stored
    weights: the 7B's estimate is the 3B's times their stored-bytes ratio."""
    measured = _measured_peak(target)
    est = target_gib(target, facts["3b"])
    assert measured <= est <= 1.15 * measured, (target, est, measured)
    ratio = facts["7b"].stored_bytes / facts["3b"].stored_bytes
    assert target_gib(target, facts["7b"]) == pytest.approx(est * ratio, rel=1e-12)


@pytest.mark.parametrize("layers", [2, 6])
def test_the_ort_estimate_covers_the_peaks_measured_at_the_3b_width(facts, layers):
    """ort_qdq's rule (a base plus a multiple of the float32 bytes) against the two carved 3B-width
    runs it was fitted to, read from their files: within [measured, measured + 2 %]; the whole 3B's
    estimate is above this 24 GB machine, which is why the plan stops it here."""
    from dataclasses import replace

    path = RESULTS / f"cpu-2026-12-04/quantize_3b_width_ort_qdq_{layers}layers.json"
    doc = json.loads(path.read_text())
    assert doc["target"] == "ort_qdq" and doc["layers"] == layers and doc["vision_blocks"] == 8
    measured = doc["write"]["peak_rss_gib"]
    est = target_gib("ort_qdq", replace(facts["3b"], params=doc["params"]))
    assert measured <= est <= 1.02 * measured, (est, measured)
    assert target_gib("ort_qdq", facts["3b"]) > 24
