"""A native pass sharded over 2 CPU processes (gloo) gives the one-process result, value for value."""

import json
import subprocess
from dataclasses import replace

import pytest
import torch
import yaml

from op_sensitivity.engines.distributed import Shard
from op_sensitivity.engines.native import run_pass
from op_sensitivity.engines.runner import load_inputs
from tests.helpers import REPO, sensitivity_params, sensitivity_stage, venv_env


def test_shards_cover_every_op_once():
    ops = [f"op{i}" for i in range(11)]
    for world in (1, 2, 3, 4):
        dealt = [Shard(r, world).dealt(ops) for r in range(world)]
        assert sorted(sum(dealt, [])) == sorted(ops)
        segments = [Shard(r, world).segment(ops) for r in range(world)]
        assert sum((seg for _, seg in segments), []) == ops  # contiguous, in order
        assert [start for start, _ in segments] == [ops.index(seg[0]) for _, seg in segments]


@pytest.mark.parametrize("requant_mode", ["cumulative", "isolated"])
def test_two_gloo_processes_give_the_one_process_values(
    default_model_dir, calibration_dir, tmp_path, requant_mode
):
    results, threads = {}, torch.get_num_threads()
    for processes in (1, 2):
        native = replace(sensitivity_params().native, requant_mode=requant_mode, processes=processes)
        params = sensitivity_params(native=native, confidence_batches=2)
        model, spec, _, _ = load_inputs(
            params, calibration_dir, default_model_dir, default_model_dir.parent / "op_inventory.json"
        )
        torch.set_num_threads(max(1, threads // 2))  # what each of the 2 processes gets
        try:
            results[processes] = run_pass(model, spec, workspace=tmp_path / str(processes))
        finally:
            torch.set_num_threads(threads)
    one, two = results[1], results[2]
    assert [c.main for c in two.capture.calls] == [c.main for c in one.capture.calls]
    assert [(c.phase, c.batch) for c in two.capture.calls] == [(c.phase, c.batch) for c in one.capture.calls]
    assert two.all_int8_mse == one.all_int8_mse
    assert two.runtime["processes"] == 2
    scored = {name for name, _ in spec.scored}
    # each trial measured by exactly one process (the merged timings name every op once)
    assert {p: set(two.runtime["trial_seconds"][p]) for p in ("fallback", "requant")} == {
        "fallback": scored,
        "requant": scored,
    }
    # one trial log per process; nothing else left behind (init file, result file)
    assert sorted(p.name for p in (tmp_path / "2").iterdir()) == [
        "native_trials.0of2.jsonl",
        "native_trials.1of2.jsonl",
    ]


def test_the_stage_runs_two_processes_from_one_param(default_model_dir, calibration_dir, tmp_path):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["sensitivity"].update(engine="native", confidence_batches=1)
    reports = {}
    for processes in (1, 2):
        data["sensitivity"]["native"]["processes"] = processes
        params_file = tmp_path / f"params{processes}.yaml"
        params_file.write_text(yaml.safe_dump(data))
        out = tmp_path / f"out{processes}"
        workspace = tmp_path / f"ws{processes}"
        subprocess.run(
            sensitivity_stage(params_file, calibration_dir, default_model_dir, out, workspace),
            env=venv_env(),
            check=True,
            capture_output=True,
        )
        reports[processes] = json.loads((out / "op_sensitivity.json").read_text())
        runtime = json.loads((out / "runtime.json").read_text())
        assert runtime.get("processes", 1) == processes
        logs = sorted(p.name for p in workspace.glob("native_trials*.jsonl"))
        assert logs == (
            ["native_trials.jsonl"]
            if processes == 1
            else ["native_trials.0of2.jsonl", "native_trials.1of2.jsonl"]
        )
    one, two = reports[1], reports[2]
    for phase in ("fallback", "requant"):
        assert [o["mse"] for o in two["phases"][phase]["ops"]] == [
            o["mse"] for o in one["phases"][phase]["ops"]
        ]
