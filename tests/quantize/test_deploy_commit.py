"""The quantize stage, run as a user runs it (the stage script, real compressed-tensors checkpoint on
the small model, no mocks): the artifact, its document and its metrics change together or not at
all, nothing is left in ``$TMPDIR`` or beside the outputs, and hand-edited inputs are refused with
one line before anything is written.

The stop test replaces only the measurement step (``deploy.measure_artifact``) with one that runs
the real measurement and then raises SIGTERM's exception, the latest point before the commit; the
run before it built the set the stop must leave untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from op_sensitivity.atomic import dump_json
from op_sensitivity.fallback.keep_list import SCHEMA_VERSION
from op_sensitivity.inventory import read_inventory
from op_sensitivity.quantize import deploy
from op_sensitivity.quantize.deploy import PROVENANCE, metrics
from tests.helpers import REPO, engine_reports, run_script, sensitivity_params, venv_env

pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed (.[ct])")
pytestmark = pytest.mark.xdist_group("quantize_commit")

TARGET = "compressed_tensors"
SCHEME = "llmcompressor_w8a8"
STAGE = REPO / "stages/quantize.py"


@dataclass
class Project:
    root: Path
    model: Path
    calibration: Path
    test: Path
    groups: list[list[str]]  # the small model's fused groups (a keep-list of whole groups)

    @property
    def out(self) -> Path:
        return self.root / "models/quantized" / TARGET

    @property
    def doc(self) -> Path:
        return self.root / "reports/quantize" / f"{TARGET}.json"

    @property
    def metrics(self) -> Path:
        return self.root / "reports/deploy" / f"{TARGET}.json"

    @property
    def spectrum(self) -> Path:
        return self.root / "reports/schemes" / SCHEME / "op_sensitivity.json"

    def keep_list(self, fallback: str) -> Path:
        return self.root / fallback / "schemes" / f"{SCHEME}.json"

    def write_keep_list(self, fallback: str, modules: list[str], scheme: str = SCHEME) -> Path:
        doc = {"schema_version": SCHEMA_VERSION, "scheme": scheme, "ops": [{"module": m} for m in modules]}
        dump_json(doc, self.keep_list(fallback))
        return self.keep_list(fallback)

    def args(self, fallback: str = "fallback", schemes: str = "reports/schemes") -> list[str]:
        return [
            *("--params", str(REPO / "params.yaml"), "--target", TARGET),
            *("--model", str(self.model), "--calibration", str(self.calibration), "--test", str(self.test)),
            *("--inventory", str(self.model.parent / "op_inventory.json")),
            *("--fallback-dir", str(self.root / fallback), "--schemes-dir", str(self.root / schemes)),
            *("--out", str(self.out), "--doc", str(self.doc), "--metrics", str(self.metrics)),
        ]


def _files(root: Path) -> dict[str, str]:
    """Every file under the outputs' directories, by path, with its sha256 (hidden ones included)."""
    out = {}
    for top in ("models", "reports/quantize", "reports/deploy"):
        for f in sorted((root / top).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def project(small_model_dir, calibration_dir, test_dir, tmp_path_factory) -> Project:
    """The small model's llmcompressor_w8a8 spectrum (native pass) and a keep-list of one fused group."""
    root = tmp_path_factory.mktemp("deploy_commit")
    params = sensitivity_params(engine="native")
    params = replace(params, native=replace(params.native, scheme=SCHEME))
    report = engine_reports(small_model_dir, calibration_dir, params, ["native"], root / "pass")["native"]
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    names = sorted({o.fused_group for o in inventory if o.fused_group})
    groups = [[o.name for o in inventory if o.fused_group == g] for g in names]
    p = Project(root, small_model_dir, calibration_dir, test_dir, groups)
    dump_json(report, p.spectrum)
    p.write_keep_list("fallback", groups[0])
    return p


@pytest.fixture(scope="module")
def first_run(project) -> tuple[subprocess.CompletedProcess, Path]:
    """The stage as DVC runs it (a subprocess), with ``$TMPDIR`` a fresh directory of its own."""
    tmpdir = project.root / "system_tmp"
    tmpdir.mkdir()
    env = {**venv_env(), "TMPDIR": str(tmpdir)}
    env.pop("DVC_STAGE", None)
    # as a fresh shell has it: importing torch._dynamo in this process set it (under /tmp) in our environment
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, str(STAGE), *project.args()],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, tmpdir


def test_a_run_commits_the_set_and_leaves_nothing_in_tmpdir_or_beside_it(project, first_run):
    _, tmpdir = first_run
    assert sorted(os.listdir(tmpdir)) == []  # no .ses, no torchinductor_<user>, no tool scratch
    assert sorted(os.listdir(project.out.parent)) == [TARGET]  # no staging sibling
    assert sorted(os.listdir(project.doc.parent)) == [project.doc.name]
    assert sorted(os.listdir(project.metrics.parent)) == [project.metrics.name]
    doc = json.loads(project.doc.read_text())
    source = json.loads((project.out / PROVENANCE).read_text())
    keep_sha = hashlib.sha256(project.keep_list("fallback").read_bytes()).hexdigest()
    assert doc["artifact"]["path"] == str(project.out)
    assert source["keep_list"]["sha256"] == doc["artifact"]["keep_list"]["sha256"] == keep_sha
    assert source["keep"] == doc["kept"] == project.groups[0]
    assert json.loads(project.metrics.read_text()) == metrics(doc)
    assert doc["artifact"]["bytes"] == sum(f.stat().st_size for f in project.out.rglob("*") if f.is_file())


def test_a_stop_in_the_measurement_leaves_the_previous_set_and_no_scratch(project, first_run, monkeypatch):
    """Another keep-list, stopped after its artifact was built and measured: the first run's
    artifact, document and metrics stay byte for byte, and no staging directory is left."""
    before = _files(project.root)
    project.write_keep_list("fallback_b", [*project.groups[0], *project.groups[1]])
    measure = deploy.measure_artifact

    def measured_then_stopped(*args, **kwargs):
        measure(*args, **kwargs)
        raise deploy_stop()

    monkeypatch.setattr(deploy, "measure_artifact", measured_then_stopped)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    code, err = run_script(STAGE, project.args("fallback_b"), project.root)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert err.splitlines()[-1] == "error: stopped by SIGTERM; outputs left as they were before this run"
    assert _files(project.root) == before
    assert sorted(os.listdir(project.out.parent)) == [TARGET]


def deploy_stop() -> BaseException:
    from op_sensitivity.cli import Terminated

    return Terminated(signal.SIGTERM)


def _refused(project: Project, args: list[str], monkeypatch) -> tuple[int, list[str]]:
    """Run the stage on ``args``: its exit code and stderr's ``error:`` lines; nothing may have been
    written (the first run's set unchanged, no sibling) and the model never loaded."""
    before = _files(project.root)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    code, err = run_script(STAGE, args, project.root)
    assert _files(project.root) == before
    assert sorted(os.listdir(project.out.parent)) == [TARGET]
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def test_a_keep_list_entry_naming_no_scored_op_is_refused_before_anything_is_written(
    project, first_run, monkeypatch
):
    path = project.write_keep_list("fallback_typo", [*project.groups[0], "lm_headx"])
    code, lines = _refused(project, project.args("fallback_typo"), monkeypatch)
    assert code == 2
    assert lines == [
        f"error: {path}: ops[{len(project.groups[0])}].module 'lm_headx' is not an op {project.spectrum} "
        "scored (a keep-list of another model or report? rerun the fallback_list stage)"
    ]


def test_a_spectrum_of_another_scheme_is_refused_before_anything_is_written(project, first_run, monkeypatch):
    other = json.loads(project.spectrum.read_text())
    other["metadata"]["scheme"]["name"] = "ort_qdq"  # the ort_qdq pass's file copied over this one
    path = project.root / "schemes_other" / SCHEME / "op_sensitivity.json"
    dump_json(other, path)
    code, lines = _refused(project, project.args(schemes="schemes_other"), monkeypatch)
    assert code == 2
    assert lines == [
        f"error: {path}: measured under scheme 'ort_qdq', expected '{SCHEME}' "
        f"(quantize target {TARGET} deploys the {SCHEME} keep-list)"
    ]


def test_a_keep_list_of_another_scheme_is_refused(project, first_run, monkeypatch):
    path = project.write_keep_list("fallback_other", project.groups[0], scheme="ort_qdq")
    code, lines = _refused(project, project.args("fallback_other"), monkeypatch)
    assert (code, len(lines)) == (2, 1)
    assert lines[0].startswith(f"error: {path}: chosen under scheme 'ort_qdq', expected '{SCHEME}'")


def test_a_file_where_an_output_directory_goes_is_one_line_before_the_build(project, first_run, monkeypatch):
    """``reports/quantize`` or ``models/quantized`` a file: one line naming it, nothing written."""
    blocked = project.root / "blocked"
    blocked.write_text("a file where an output directory goes")
    for flag, name in (("--doc", f"{TARGET}.json"), ("--out", TARGET)):
        args = project.args()
        args[args.index(flag) + 1] = str(blocked / name)
        code, lines = _refused(project, args, monkeypatch)
        assert code == 2
        assert lines == [f"error: {blocked}: File exists ({blocked} is a file, where a directory must be)"]
