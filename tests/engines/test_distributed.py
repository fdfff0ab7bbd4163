"""A native pass sharded over CPU processes (gloo): the one-process bytes, bounded by the machine, a
private rendezvous per run, and workers that never outlive the stage (real processes, real signals)."""

import contextlib
import json
import signal
import subprocess
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from op_sensitivity.engines import distributed
from op_sensitivity.engines.distributed import Shard, check_processes, usable_cores
from op_sensitivity.engines.native import run_pass
from op_sensitivity.engines.runner import load_inputs
from op_sensitivity.errors import InputError, PipelineError
from tests.helpers import REPO, sensitivity_params, sensitivity_stage, venv_env

needs_two_cores = pytest.mark.skipif(usable_cores() < 2, reason="2 processes need 2 usable cores")


def test_shards_cover_every_op_once():
    ops = [f"op{i}" for i in range(11)]
    for world in (1, 2, 3, 4):
        dealt = [Shard(r, world).dealt(ops) for r in range(world)]
        assert sorted(sum(dealt, [])) == sorted(ops)
        segments = [Shard(r, world).segment(ops) for r in range(world)]
        assert sum((seg for _, seg in segments), []) == ops  # contiguous, in order
        assert [start for start, _ in segments] == [ops.index(seg[0]) for _, seg in segments]


def _inputs(model_dir, calibration_dir, processes, **native):
    native = replace(sensitivity_params().native, processes=processes, **native)
    params = sensitivity_params(native=native, confidence_batches=2)
    return load_inputs(params, calibration_dir, model_dir, model_dir.parent / "op_inventory.json")


@needs_two_cores
@pytest.mark.parametrize("requant_mode", ["cumulative", "isolated"])
def test_two_gloo_processes_give_the_one_process_values(
    default_model_dir, calibration_dir, tmp_path, requant_mode
):
    """With the torch threads one process computes with (2 here: one each would change the sums)."""
    results, threads = {}, torch.get_num_threads()
    torch.set_num_threads(2)  # the xdist workers run on 1: the case the bug needs is 2
    try:
        for processes in (1, 2):
            model, spec, _, _ = _inputs(
                default_model_dir, calibration_dir, processes, requant_mode=requant_mode
            )
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
    # one trial log per process; nothing else left behind (the run's rendezvous, result)
    assert sorted(p.name for p in (tmp_path / "2").iterdir()) == [
        "native_trials.0of2.jsonl",
        "native_trials.1of2.jsonl",
    ]


def test_processes_are_bounded_by_the_machine_before_any_work(default_model_dir, calibration_dir, tmp_path):
    cores = usable_cores()
    with pytest.raises(InputError) as e:
        check_processes(cores + 1, torch.device("cpu"), "p.yaml: sensitivity.native.processes")
    assert str(e.value).startswith(f"p.yaml: sensitivity.native.processes: {cores + 1} processes on cpu")
    assert f"at most {cores}" in str(e.value) and "sched_getaffinity" in str(e.value)
    check_processes(cores, torch.device("cpu"), "p")  # as many as cores: fine
    gpus = torch.cuda.device_count()
    with pytest.raises(InputError, match=f"need one GPU each, this machine shows {gpus} .*at most {gpus}"):
        check_processes(max(2, gpus + 1), torch.device("cuda"), "p")
    # through the pass: no process started, nothing written
    model, spec, _, _ = _inputs(default_model_dir, calibration_dir, 1000)
    with pytest.raises(InputError, match=r"sensitivity\.native\.processes: 1000 processes on cpu"):
        run_pass(model, spec, workspace=tmp_path / "ws")
    assert _workers() == []
    assert not (tmp_path / "ws").exists()


def test_a_worker_that_cannot_rendezvous_fails_with_one_line(tmp_path, monkeypatch):
    """Process 1 of 2 alone at its run's store: a PipelineError after the timeout, not a hang."""
    monkeypatch.setattr(distributed, "RENDEZVOUS_SECONDS", 1.0)
    start = time.monotonic()
    with pytest.raises(PipelineError) as e:
        distributed._join(1, 2, tmp_path, torch.device("cpu"), "p.yaml: sensitivity.native.processes")
    assert time.monotonic() - start < 30
    message = str(e.value)
    assert message.startswith(
        "p.yaml: sensitivity.native.processes: process 1 of 2 could not meet the others"
    )
    assert "within 1 s" in message and "\n" not in message
    assert not torch.distributed.is_initialized()


def _fails_with_input_error(model, spec, *, workspace, shard):
    if shard.rank == 1:
        raise InputError("case.yaml: sensitivity.native.x: what a worker found wrong")
    time.sleep(60)  # rank 0 would wait for rank 1 at the first gather: the stage stops it


@needs_two_cores
def test_a_workers_pipeline_error_is_the_stages(default_model_dir, calibration_dir, tmp_path):
    """Raised as itself in the stage (one line, exit 2), the other worker stopped at once."""
    model, spec, _, _ = _inputs(default_model_dir, calibration_dir, 2)
    start = time.monotonic()
    with pytest.raises(InputError, match="^case.yaml: sensitivity.native.x: what a worker found wrong$"):
        distributed.run_sharded(_fails_with_input_error, model, spec, tmp_path, torch.device("cpu"))
    assert time.monotonic() - start < 50
    assert _workers() == []
    assert list(tmp_path.iterdir()) == []  # the run's private directory removed


def _stage(tmp_path: Path, model_dir: Path, calibration_dir: Path, processes: int, name: str) -> list[str]:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["sensitivity"].update(engine="native", confidence_batches=2)
    data["sensitivity"]["native"]["processes"] = processes
    params_file = tmp_path / f"params{processes}.yaml"
    params_file.write_text(yaml.safe_dump(data))
    return sensitivity_stage(
        params_file, calibration_dir, model_dir, tmp_path / name, tmp_path / f"ws-{name}"
    )


def _runtime(out: Path) -> dict:
    """The pass's runtime doc in the stage's runtime file (``passes``: one per pass)."""
    doc = json.loads((out / "runtime.json").read_text())
    return doc.get("passes", [doc])[0]


@pytest.fixture(scope="module")
def stage_runs(default_model_dir, calibration_dir, tmp_path_factory) -> tuple[Path, dict[int, bytes]]:
    """The stage with processes 1 and 2: its op_sensitivity.json bytes."""
    tmp, reports = tmp_path_factory.mktemp("stage"), {}
    for processes in (1, 2):
        subprocess.run(
            _stage(tmp, default_model_dir, calibration_dir, processes, f"out{processes}"),
            env=venv_env(),
            check=True,
            capture_output=True,
        )
        reports[processes] = (tmp / f"out{processes}/op_sensitivity.json").read_bytes()
        assert _runtime(tmp / f"out{processes}").get("processes", 1) == processes
        logs = sorted(p.name for p in (tmp / f"ws-out{processes}").iterdir())
        assert logs == (
            ["native_trials.jsonl", "partial_capture.json"]
            if processes == 1
            else ["native_trials.0of2.jsonl", "native_trials.1of2.jsonl", "partial_capture.json"]
        )
    return tmp, reports


@needs_two_cores
def test_the_stage_runs_two_processes_from_one_param_with_the_same_bytes(stage_runs):
    _, reports = stage_runs
    assert reports[2] == reports[1]


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _workers(pid: int | None = None) -> list[psutil.Process]:
    """The spawned workers under ``pid`` (this process by default), not multiprocessing's resource tracker."""
    return [
        p
        for p in psutil.Process(pid).children(recursive=True)
        if "multiprocessing.spawn" in _cmd(p) and "resource_tracker" not in _cmd(p)
    ]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _default_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


@needs_two_cores
@pytest.mark.parametrize(
    "signum",
    # SIGINT (Ctrl-C) takes the way out SIGTERM takes (an exception through the same finally)
    [signal.SIGKILL, signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=lambda s: s.name,
)
def test_no_worker_outlives_a_killed_stage_and_a_rerun_gives_the_same_bytes(
    stage_runs, default_model_dir, calibration_dir, signum
):
    """Killed while both workers measure: within seconds no process of the run is left (the
    workers follow the stage even on SIGKILL), and the rerun at once resumes to the same bytes:
    a killed run's rendezvous (the old shared ``/dist_init``) never reaches the next. The workers
    are frozen (SIGSTOP) just before the kill, so none can finish the pass and exit on its own."""
    tmp, reports = stage_runs
    name = f"killed-{signum.name}"
    cmd = _stage(tmp, default_model_dir, calibration_dir, 2, name)
    workspace = tmp / f"ws-{name}"
    errors = tmp / f"{name}.stderr"
    with errors.open("w") as stderr:  # a file: a pipe the workers inherit would wait for them
        proc = subprocess.Popen(cmd, env=venv_env(), stderr=stderr, text=True, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + 240
        logs = [workspace / f"native_trials.{rank}of2.jsonl" for rank in (0, 1)]
        while not all(p.exists() and len(p.read_text().splitlines()) >= 2 for p in logs):
            assert proc.poll() is None and time.monotonic() < deadline, errors.read_text()
            time.sleep(0.02)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        workers = _workers(proc.pid)
        assert len(workers) == 2, [_cmd(p) for p in descendants]
        for worker in workers:
            worker.suspend()
        proc.send_signal(signum)
        proc.wait(timeout=60)
    except BaseException:
        for p in [*_workers(proc.pid), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        raise
    err = errors.read_text()
    if signum == signal.SIGKILL:
        assert proc.returncode == -signum
    else:
        assert proc.returncode == 128 + signum, err
        assert f"stopped by {signum.name}" in err and "Traceback" not in err
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in descendants) and time.monotonic() < deadline:
        time.sleep(0.05)
    left_alive = [p for p in descendants if _alive(p)]
    for p in left_alive:
        p.kill()
    assert [_cmd(p) for p in left_alive] == []
    assert not (tmp / name / "op_sensitivity.json").exists()
    # its private directory: left by SIGKILL (the dead run's store in it), removed on any other way out
    left = list(workspace.glob(".native_processes*"))
    assert [p.name for d in left for p in d.iterdir() if p.name == "rendezvous"] == (
        ["rendezvous"] if signum == signal.SIGKILL else []
    )
    rerun = subprocess.run(cmd, env=venv_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp / name / "op_sensitivity.json").read_bytes() == reports[2]
    assert _runtime(tmp / name)["trials_resumed"] > 0
    assert not list(workspace.glob(".native_processes*"))  # the killed run's is gone too


def test_the_collective_timeout_outlasts_any_shard():
    """Collectives wait for the slowest shard (gloo's default of 30 min would kill a long pass):
    the stage watches the workers instead; only the rendezvous has a short timeout."""
    assert timedelta(days=1) <= distributed.COLLECTIVE_TIMEOUT
    assert distributed.RENDEZVOUS_SECONDS <= 600
