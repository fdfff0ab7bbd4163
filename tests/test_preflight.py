"""check_params (the DAG's first stage) and scripts/check_params.py (what `make repro` runs before
DVC) refuse what a later stage would refuse, before DVC deletes that stage's outputs.

Each case was, on b375a75, accepted by the check and refused (or crashed) later, after DVC had
removed outputs: it must now give exit 2, one ``error:`` line naming the param or file, and
leave every file of the workspace as it was. A real ``dvc repro`` shows the same for the first
case, and the stage-lifetime test kills a real parent with SIGKILL.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from op_sensitivity.params import TORCH_SEED_MAX, TORCH_SEED_MIN
from tests.helpers import REPO, SAMPLE_IMAGES, copy_repo, run_script, venv_env
from tests.test_bad_input import good_params

STAGE = REPO / "stages/check_params.py"
SCRIPT = REPO / "scripts/check_params.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """The outputs a later stage would lose: the three splits of a good prepare_captions run."""
    ws = tmp_path_factory.mktemp("preflight")
    (ws / "params.yaml").write_text(yaml.safe_dump(good_params(), sort_keys=False))
    (ws / "data/onnx").mkdir(parents=True)
    code, err = run_script(REPO / "stages/prepare_captions.py", ["--params", "params.yaml"], ws)
    assert code == 0, err
    code, err = run_script(STAGE, ["--params", "params.yaml", "--out", "reports/params_check.json"], ws)
    assert code == 0, err
    return ws


def snapshot(ws: Path) -> dict[str, str]:
    skip = {"case.yaml", "bad", "logs"}
    return {
        str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ws.rglob("*"))
        if p.is_file() and not skip & set(p.relative_to(ws).parts)
    }


def _set(block: str, **values) -> Callable[[dict], None]:
    return lambda d: d[block].update(values)


def _native(**values) -> Callable[[dict], None]:
    return lambda d: d["sensitivity"]["native"].update(values)


def _bits_budget(d: dict) -> None:
    d["fallback"].update(
        policy="bits_budget", bits_budget={"metric": "kl", "bits": 8.01}, always_keep=["lm_head"]
    )


def _images_with(name: bytes) -> Callable[[Path, Path], None]:
    """captions.images_dir: a copy of the sample images plus a file named ``name`` (bytes)."""

    def setup(ws: Path, bad: Path) -> None:
        shutil.copytree(SAMPLE_IMAGES, bad / "images")
        with open(os.path.join(os.fsencode(bad / "images"), name), "wb") as f:
            f.write(b"x")
        params = good_params()
        params["captions"]["images_dir"] = str(bad / "images")
        (ws / "case.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    return setup


def _raw(text: Callable[[str], str] | bytes) -> Callable[[Path, Path], None]:
    """case.yaml written as given (a transform of the good file's text, or raw bytes)."""

    def setup(ws: Path, bad: Path) -> None:
        good = yaml.safe_dump(good_params(), sort_keys=False)
        (ws / "case.yaml").write_bytes(text if isinstance(text, bytes) else text(good).encode())

    return setup


def _directory(ws: Path, bad: Path) -> None:
    (ws / "case.yaml").mkdir()


@dataclass
class Case:
    id: str
    expected: str  # a substring of the one error line
    params: Callable[[dict], None] | None = None
    files: Callable[[Path, Path], None] | None = None  # writes case.yaml itself
    cuda: bool | None = None  # run only where torch.cuda.is_available() is this


CASES = [
    # --- checked too late on b375a75: DVC had deleted outputs when the stage refused -------------
    Case(  # 26 files of data/ lost under dvc repro
        "count-above-the-images",
        "case.yaml: captions.count: expected at most 20 (images with captions), got 21",
        _set("captions", count=21),
    ),
    Case(  # 8 + 6 + 7 > 20: neither the check nor the plan caught it
        "test-count-above-what-is-left",
        "case.yaml: captions.test_count: expected at most 6 (images with captions outside the calibration "
        "sample and the selection split (captions.count + selection_count)), got 7",
        _set("captions", count=8, selection_count=6, test_count=7),
    ),
    Case(
        "always-keep-matches-no-op",
        "case.yaml: fallback.always_keep[0]: 'lm_headx' matches no op of the model",
        _set("fallback", always_keep=["lm_headx"]),
    ),
    Case(
        "bits-budget-below-the-forced-ops",
        "case.yaml: fallback.bits_budget: 8.01 effective weight bits leave no room for any op with a "
        "measured gain (the forced ops",
        _bits_budget,
    ),
    Case(
        "model-input-not-a-sample",
        "case.yaml: model.input: README.md is not a calibration sample (with source tiny",
        _set("model", input="README.md"),
    ),
    Case(
        "screening-in-bfloat16",
        "case.yaml: sensitivity.native.screening: bfloat16 screening refines in float32",
        _native(screening="bfloat16", dtype="bfloat16"),
    ),
    Case(
        "report-block-omitted",
        "case.yaml: report: expected a mapping (the block is missing)",
        lambda d: d.pop("report"),
    ),
    Case(
        "op-name-dict-matches-no-op",
        "case.yaml: sensitivity.op_name_dict.lm_headx: matches no op of the model",
        lambda d: d["sensitivity"].update(op_name_dict={"lm_headx": {"weight": {"dtype": ["fp32"]}}}),
    ),
    Case(
        "max-ops-below-the-pass",
        "case.yaml: sensitivity.max_ops: the pass would score",
        _set("sensitivity", max_ops=3),
    ),
    # --- tracebacks on b375a75 ------------------------------------------------------------------
    Case(
        "seed-beyond-torch",
        f"case.yaml: model.seed: expected an integer in [{TORCH_SEED_MIN}, {TORCH_SEED_MAX}], got {10**23}",
        _set("model", seed=10**23),
    ),
    Case("params-a-directory", "case.yaml: is a directory, expected the params YAML file", files=_directory),
    Case("params-not-utf8", "case.yaml: not UTF-8 text (byte 9", files=_raw(b"captions:\xff\n")),
    # --- silently accepted on b375a75 -----------------------------------------------------------
    Case(
        "curve-block-twice",
        "case.yaml: line ",  # the line numbers depend on the dump; the rest is checked below
        files=_raw(lambda good: good + "curve:\n  metric: top1\n"),
    ),
    Case(
        "tf32-on-a-cpu",
        "case.yaml: sensitivity.native.allow_tf32: TF32 is a CUDA matmul mode (device cpu)",
        _native(allow_tf32=True),
        cuda=False,
    ),
    # --- leftovers: DVC itself fails on this name, naming neither file nor param ----------------
    Case(
        "image-name-not-utf8",
        "case.yaml: captions.images_dir: ",
        files=_images_with(b"\xff.jpg"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("script", [STAGE, SCRIPT], ids=["stage", "make-repro"])
def test_a_later_stage_rule_stops_check_params_first(workspace, case, script):
    if case.cuda is not None and torch.cuda.is_available() != case.cuda:
        pytest.skip("needs a machine with" + ("" if case.cuda else "out") + " CUDA")
    ws, bad = workspace, workspace / "bad"
    bad.mkdir()
    try:
        if case.files:
            case.files(ws, bad)
        else:
            data = good_params()
            if case.params:
                case.params(data)
            (ws / "case.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        before = snapshot(ws)
        args = ["--params", "case.yaml", "--out", "reports/params_check.json"] if script == STAGE else None
        code, err = run_script(script, args or ["case.yaml", "--no-probe"], ws)
    finally:
        shutil.rmtree(bad, ignore_errors=True)
        target = ws / "case.yaml"
        target.rmdir() if target.is_dir() else target.unlink(missing_ok=True)
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and f"error: {case.expected}" in lines[0], err
    if case.id == "curve-block-twice":
        assert "key 'curve' written twice (first at line " in lines[0], lines[0]
    if case.id == "image-name-not-utf8":
        assert lines[0].endswith(
            "\\xff.jpg: the file name is not UTF-8 (byte 0), which DVC cannot hash; rename or remove it"
        ), lines[0]
    assert snapshot(ws) == before


@pytest.mark.parametrize("scratch", ["reports/runtime", ".op_sensitivity_work"])
def test_a_file_where_stages_write_a_directory_is_named_first(workspace, scratch):
    """Not DVC outputs, so DVC never clears them: a file there failed sensitivity after it wrote
    op_sensitivity.json (reports/runtime) on b375a75."""
    (workspace / scratch).write_text("a file\n")
    before = snapshot(workspace)
    try:
        args = ["--params", "params.yaml", "--out", "reports/params_check.json"]
        code, err = run_script(STAGE, args, workspace)
        code2, err2 = run_script(SCRIPT, ["params.yaml", "--no-probe"], workspace)
        after = snapshot(workspace)
    finally:
        (workspace / scratch).unlink()
    line = f"error: {scratch}: a file where the stages write a directory; remove it"
    assert (code, code2) == (2, 2) and err.strip() == line and err2.strip() == line, (err, err2)
    assert after == before


def test_good_params_pass_both_checks(workspace):
    code, err = run_script(
        STAGE, ["--params", "params.yaml", "--out", "reports/params_check.json"], workspace
    )
    assert code == 0, err
    code, err = run_script(SCRIPT, ["params.yaml", "--no-probe", "--all"], workspace)
    assert code == 0, err


def test_ops_kept_fp32_by_op_name_dict_pass_both_checks(workspace):
    """Sweep of 983f34b: an op_name_dict that keeps ops fp32 (a first 3B run's advice) made
    check_params end in an AttributeError traceback before any stage ran."""
    data = good_params()
    data["sensitivity"]["op_name_dict"] = {
        "lm_head": {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}
    }
    (workspace / "case.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        args = ["--params", "case.yaml", "--out", "reports/params_check.json"]
        code, err = run_script(STAGE, args, workspace)
        code2, err2 = run_script(SCRIPT, ["case.yaml", "--no-probe"], workspace)
    finally:
        (workspace / "case.yaml").unlink()
    assert (code, code2) == (0, 0), (err, err2)
    assert "Traceback" not in err + err2


def test_check_params_refuses_what_prepare_captions_refuses_with_the_same_line(workspace):
    """One rule, one function: the stage's own line and check_params's are the same."""
    data = good_params()
    data["captions"].update(count=8, selection_count=6, test_count=7)
    (workspace / "case.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    before = snapshot(workspace)
    try:
        lines = []
        for script, args in (
            (STAGE, ["--params", "case.yaml", "--out", "reports/params_check.json"]),
            (REPO / "stages/prepare_captions.py", ["--params", "case.yaml"]),
        ):
            code, err = run_script(script, args, workspace)
            assert code == 2, err
            lines.append([ln for ln in err.splitlines() if ln.startswith("error: ")])
    finally:
        (workspace / "case.yaml").unlink()
    assert lines[0] == lines[1] and len(lines[0]) == 1, lines
    assert snapshot(workspace) == before


# --- a real dvc repro: check_params stops it before prepare_captions' outputs are deleted ---------


@pytest.mark.slow
def test_dvc_repro_stops_at_check_params_and_keeps_the_splits(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    env = venv_env()
    dvc = [str(Path(sys.executable).parent / "dvc")]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    good = subprocess.run(
        [*dvc, "repro", "prepare_captions"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert good.returncode == 0, good.stderr
    data = {
        str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "data").rglob("*")) if p.is_file()
    }
    params["captions"]["count"] = 21
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = subprocess.run(
        [*dvc, "repro", "prepare_captions"], cwd=repo, env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    assert "error: params.yaml: captions.count: expected at most 20 (images with captions), got 21" in out, (
        out
    )
    assert "Running stage 'prepare_captions'" not in out, out
    after = {
        str(p.relative_to(repo)): p.read_bytes() for p in sorted((repo / "data").rglob("*")) if p.is_file()
    }
    assert after == data  # the three splits (and the sample COCO) as they were


# --- the stage's lifetime: a killed parent ends it ----------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from op_sensitivity.atomic import atomic_dir
    from op_sensitivity.cli import run_stage
    from op_sensitivity.lifetime import stop_with_parent

    def main():
        stop_with_parent()
        out = Path(sys.argv[1])
        with atomic_dir(out / "result") as tmp:
            (tmp / "part").write_text("half")
            (out / "started").write_text(str(os.getpid()))
            time.sleep(120)

    run_stage(main)
    """
)


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("shell", ["exec", "sh"], ids=["parent", "through-a-shell"])
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_stage_stops_when_the_process_that_started_it_dies(tmp_path, shell, signum):
    """The stage's parent (a stand-in for ``dvc repro``, which sets no SIGTERM handler) is killed;
    the stage must unwind (its temporary output removed) within seconds, not run on alone."""
    (tmp_path / "child.py").write_text(CHILD)
    cmd = f"{sys.executable} {tmp_path / 'child.py'} {tmp_path}"
    inner = f"['sh', '-c', {cmd + '; true'!r}]" if shell == "sh" else f"{cmd.split()!r}"  # '; true': no exec
    parent = f"import subprocess, sys, time\np = subprocess.Popen({inner})\ntime.sleep(600)\n"
    env = {**venv_env(), "DVC_STAGE": "fake_stage"}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env, stderr=subprocess.DEVNULL)
    started = tmp_path / "started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started.exists()
    child = int(started.read_text())
    proc.send_signal(signum)
    proc.wait()
    assert _gone(child, 10), f"stage {child} still running after its parent's {signal.Signals(signum).name}"
    assert not (tmp_path / "result").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("result")] == []


def test_a_stage_run_by_hand_keeps_its_own_lifetime(monkeypatch):
    from op_sensitivity.lifetime import stop_with_parent

    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert stop_with_parent() is None  # outside `dvc repro` nothing is watched
