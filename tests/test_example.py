"""docs/example/ holds the embedded default's report and plots as `make repro` writes them, so a
newcomer reads the outcome before running anything. It is current when its bytes are the outputs
dvc.lock records (CI's `make repro` and scripts/check_reproduced.py hold dvc.lock to what the run
writes): `make example` copies them again after a run that changed them."""

import hashlib
from pathlib import Path

import yaml
from dvc_data.hashfile.hash_info import HashInfo
from dvc_data.hashfile.meta import Meta
from dvc_data.hashfile.tree import Tree

from tests.helpers import REPO

EXAMPLE = REPO / "docs" / "example"
# example file or folder -> the DVC output it copies
COPIES = {"op_sensitivity.md": "reports/op_sensitivity.md", "plots": "reports/plots"}


def _locked() -> dict[str, str]:
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dvc_hash(path: Path) -> str:
    """The md5 DVC records for a file, or for a folder (``<md5 of its listing>.dir``)."""
    if path.is_file():
        return _md5(path)
    tree = Tree()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        tree.add(f.relative_to(path).parts, Meta(size=f.stat().st_size), HashInfo("md5", _md5(f)))
    tree.digest()
    return tree.hash_info.value


def test_the_example_is_the_committed_runs_report_and_plots():
    locked = _locked()
    stale = {name: out for name, out in COPIES.items() if dvc_hash(EXAMPLE / name) != locked[out]}
    assert not stale, f"docs/example is not the run dvc.lock records: {stale} (run `make example`)"
    links = [line for line in (EXAMPLE / "op_sensitivity.md").read_text().splitlines() if "](plots/" in line]
    assert links and all((EXAMPLE / line.split("](")[1].rstrip(")")).is_file() for line in links)


def test_a_changed_plot_is_caught(tmp_path):
    """The folder hash sees one byte of one plot (what makes the test above able to fail)."""
    import shutil

    copy = tmp_path / "plots"
    shutil.copytree(EXAMPLE / "plots", copy)
    assert dvc_hash(copy) == dvc_hash(EXAMPLE / "plots")
    png = sorted(copy.iterdir())[0]
    png.write_bytes(png.read_bytes() + b"\0")
    assert dvc_hash(copy) != dvc_hash(EXAMPLE / "plots")
