"""The sensitivity stage end to end (real subprocess): same inputs -> same bytes; timings apart."""

import json
from pathlib import Path

import yaml

from tests.helpers import REPO, run, sensitivity_stage


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_keys(v) for v in obj.values()))
    if isinstance(obj, list):
        return set().union(*(_keys(v) for v in obj)) if obj else set()
    return set()


def test_sensitivity_stage_twice_gives_identical_bytes(default_model_dir, calibration_dir, tmp_path):
    """The embedded default's sizes through the real stage script, twice (native engine: seconds)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sensitivity"].update(engine="native", confidence_batches=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    outs = []
    for i in (1, 2):
        run(
            sensitivity_stage(
                Path("params.yaml"),
                calibration_dir,
                default_model_dir,
                Path(f"run{i}"),
                Path("work"),
                "python",
            ),
            tmp_path,
        )
        outs.append(tmp_path / f"run{i}")
    for name in ("op_sensitivity.json", "metrics.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    report = json.loads((outs[0] / "op_sensitivity.json").read_text())
    assert len(report["phases"]["fallback"]["ops"]) == 29
    assert not {k for k in _keys(report) if "seconds" in k or "peak" in k or k == "host"}
    doc = json.loads((outs[0] / "runtime.json").read_text())
    runtime = doc["passes"][0]
    assert doc["seconds"] == round(sum(runtime["seconds"].values()), 3) and doc["peak_gib"] > 0
    assert runtime["engine"] == "native" and runtime["seconds"]["fallback"] > 0
    assert runtime["seconds_per_op"] > 0 and runtime["peak_rss_gib"] > 0 and runtime["host"]["cpu_count"] >= 1
    partial = json.loads((tmp_path / "work/partial_capture.json").read_text())
    assert partial["run"]["engine"] == "native" and partial["run"]["params"]["confidence_batches"] == 2
    assert partial["run"]["model_sha256"] == report["metadata"]["model"]["sha256"]
    assert [(c["phase"], c["batch"]) for c in partial["calls"]] == [
        ("fallback", 0),
        ("requant", 0),
        ("fallback", 1),
        ("requant", 1),
    ]
