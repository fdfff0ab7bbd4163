"""Shared fixtures: small real artifacts built with the library itself (no mocks)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from op_sensitivity.coco_captions import prepare_calibration
from op_sensitivity.inventory import op_inventory, write_inventory
from op_sensitivity.model_source import materialize_model
from op_sensitivity.params import load_params

REPO = Path(__file__).resolve().parents[1]
SAMPLE_ANNOTATIONS = REPO / "data/coco-sample/annotations/captions_sample2017.json"
SAMPLE_IMAGES = REPO / "data/coco-sample/sample2017"
# Smallest sizes that keep every op kind: 1 vision block (window = full attention), 1 decoder layer.
SMALL_TINY = {
    "text": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "vision": {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2},
}


@pytest.fixture(scope="session")
def repo_params():
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory, repo_params) -> Path:
    out = tmp_path_factory.mktemp("cal") / "calibration"
    prepare_calibration(
        replace(repo_params.captions, annotations=SAMPLE_ANNOTATIONS, images_dir=SAMPLE_IMAGES, count=4), out
    )
    return out


@pytest.fixture(scope="session")
def small_model_params(repo_params):
    tiny = replace(repo_params.model.tiny, text=SMALL_TINY["text"], vision=SMALL_TINY["vision"])
    return replace(repo_params.model, tiny=tiny)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, calibration_dir, small_model_params) -> Path:
    out = tmp_path_factory.mktemp("model") / "qwen2_5_vl"
    model, card = materialize_model(small_model_params, calibration_dir, out)
    write_inventory(op_inventory(model), card.model_type, out.parent / "op_inventory.json")
    return out


def venv_env() -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin first, so `python` and `dvc` are ours."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def copy_repo(dest: Path) -> Path:
    """A fresh git repo holding the tracked files of this checkout (what a clone would have)."""
    files = run(["git", "ls-files"], REPO).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    run(["git", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "copy"], dest)
    return dest
