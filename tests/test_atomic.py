"""What a stage's writes leave behind: the old output or the new one, and no stray sibling."""

from __future__ import annotations

import getpass
import os
import signal
import tempfile
from pathlib import Path

import pytest

from op_sensitivity import atomic
from op_sensitivity.atomic import atomic_dir, commit, committed, forget_committed, private_tmp, staging


def test_atomic_dir_replacing_a_file_leaves_no_sibling(tmp_path):
    out = tmp_path / "artifact"
    out.write_text("a file where the directory goes")
    with atomic_dir(out) as tmp:
        (tmp / "model.bin").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert (out / "model.bin").read_text() == "new"


def test_atomic_dir_replacing_a_directory_leaves_no_sibling(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "model.bin").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
    assert sorted(p.name for p in out.iterdir()) == ["model.bin"]


def test_staging_is_removed_on_error_and_a_dead_runs_staging_on_the_next_run(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(RuntimeError), staging(out) as stage:
        (stage / "half").write_text("x")
        raise RuntimeError("the build failed")
    assert list(tmp_path.iterdir()) == []
    dead = tmp_path / f".artifact{atomic.TMP_TAG}999999999-abc"  # no such PID: a killed run's
    dead.mkdir()
    (dead / "deploy.yaml").write_text("x")
    with staging(out) as stage:
        assert [p.name for p in tmp_path.iterdir()] == [stage.name]
    assert list(tmp_path.iterdir()) == []


def test_commit_holds_sigterm_until_every_rename_is_done(tmp_path, monkeypatch):
    """A SIGTERM that lands after the first rename is raised after the last one, never between."""

    class Stopped(BaseException):
        pass

    def stop(signum, frame):
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    swap = atomic._swap_in

    def swap_then_kill(tmp: Path, target: Path) -> None:
        swap(tmp, target)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(atomic, "_swap_in", swap_then_kill)
    built = tmp_path / "built"
    built.mkdir()
    (built / "doc.json").write_text("new doc")
    (built / "artifact").mkdir()
    (built / "artifact" / "model.bin").write_text("new model")
    targets = [tmp_path / "doc.json", tmp_path / "artifact"]
    targets[0].write_text("old doc")
    forget_committed()
    try:
        with pytest.raises(Stopped):
            commit([(built / "doc.json", targets[0]), (built / "artifact", targets[1])])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert targets[0].read_text() == "new doc"
    assert (targets[1] / "model.bin").read_text() == "new model"
    assert committed() == targets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "built", "doc.json"]


def test_commit_refuses_a_directory_where_a_file_goes_before_any_rename(tmp_path):
    built = tmp_path / "built"
    built.mkdir()
    (built / "doc.json").write_text("new")
    (built / "metrics.json").write_text("new")
    (tmp_path / "metrics.json").write_text("old")
    (tmp_path / "doc.json").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        commit(
            [(built / "metrics.json", tmp_path / "metrics.json"), (built / "doc.json", tmp_path / "doc.json")]
        )
    assert e.value.filename == str(tmp_path / "doc.json")
    assert (tmp_path / "metrics.json").read_text() == "old"


def test_private_tmp_points_tempfile_and_tmpdir_there_and_back(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "system"))
    before = tempfile.tempdir
    with private_tmp(tmp_path / "scratch") as scratch:
        assert os.environ["TMPDIR"] == str(scratch.resolve())
        assert Path(tempfile.mkdtemp()).parent == scratch.resolve()
    assert os.environ["TMPDIR"] == str(tmp_path / "system") and tempfile.tempdir == before


def test_what_libraries_write_to_tmpdir_at_import_lands_in_the_private_tmp(tmp_path):
    """``import onnxruntime`` may write its telemetry session file ``.ses`` to ``$TMPDIR`` (from a
    thread: not in every run; ``disable_telemetry_events()`` does not stop it); importing torch's
    compiler stack makes ``torchinductor_<user>`` there. Under :func:`private_tmp` whatever they
    write lands in the stage's scratch, and the system's directory stays empty."""
    pytest.importorskip("onnxruntime")
    import subprocess
    import sys

    system, scratch = tmp_path / "system", tmp_path / "scratch"
    system.mkdir()
    code = (
        "import sys\n"
        "from op_sensitivity.atomic import private_tmp\n"
        "with private_tmp(sys.argv[1]):\n"
        "    import onnxruntime, torch._dynamo\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # as a fresh shell has it
    env["TMPDIR"] = str(system)
    subprocess.run([sys.executable, "-c", code, str(scratch)], env=env, check=True)
    assert sorted(os.listdir(system)) == []
    assert f"torchinductor_{getpass.getuser()}" in os.listdir(scratch)
    assert set(os.listdir(scratch)) <= {".ses", f"torchinductor_{getpass.getuser()}"}
