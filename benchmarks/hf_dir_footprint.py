"""What `dvc repro load_model` writes when the model is a user's snapshot (`model.source: hf_dir`).

    python benchmarks/hf_dir_footprint.py --snapshot /tmp/snap3b --make-snapshot
    python benchmarks/hf_dir_footprint.py --snapshot /models/Qwen2.5-VL-3B-Instruct

The snapshot must stay where it is: the stage may write only what it derives (op inventory,
processor files, a card with the snapshot's hash) plus DVC's own bookkeeping. This script
clones the repository's committed HEAD into a scratch directory, points `model.input` at the
snapshot, runs `dvc repro load_model` there and reports

* ``written_bytes``: bytes the `dvc` process tree sent to storage (``getrusage(RUSAGE_CHILDREN)
  .ru_oublock`` x 512, the kernel's per-task write accounting of every reaped child);
* ``tree_bytes``: the clone's apparent size after minus before (``models/``, ``reports/``,
  ``.dvc/cache``, ``.dvc/tmp``), and its largest files;
* the snapshot's own size, for scale.

``--make-snapshot`` first writes a snapshot of the full-size 3B architecture with seeded random
bf16 weights (the published checkpoint's size and layout) where ``--snapshot`` points, with the
library's own ``full_size_random`` source.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tree_sizes(root: Path) -> dict[str, int]:
    """Apparent size of every file under ``root`` (symlinks not followed), by relative path."""
    sizes = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if not path.is_symlink():
                sizes[str(path.relative_to(root))] = path.stat().st_size
    return sizes


def make_snapshot(path: Path, size: str) -> None:
    from op_sensitivity.model.source import materialize_model
    from op_sensitivity.params import load_params

    params = load_params(REPO / "params.yaml").model  # its input: the sample of `make repro`
    params = replace(params, source="full_size_random", full_size=size, input=REPO / params.input)
    materialize_model(params, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--make-snapshot", action="store_true")
    ap.add_argument("--size", default="3b", choices=("3b", "7b"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    snapshot = args.snapshot.resolve()
    if args.make_snapshot and not snapshot.exists():
        start = time.perf_counter()
        make_snapshot(snapshot, args.size)
        print(f"snapshot written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    snap_bytes = sum(tree_sizes(snapshot).values())

    scratch = Path(tempfile.mkdtemp(prefix="hf_dir_footprint_"))
    clone = scratch / "repo"
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        params = yaml.safe_load((clone / "params.yaml").read_text())
        params["model"].update(source="hf_dir", input=str(snapshot))
        (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        before = tree_sizes(clone)
        written0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
        start = time.perf_counter()
        subprocess.run(["dvc", "repro", "load_model"], cwd=clone, env=env, check=True)
        seconds = time.perf_counter() - start
        written = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - written0) * 512
        after = tree_sizes(clone)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    grown = {p: s - before.get(p, 0) for p, s in after.items() if s != before.get(p, 0)}
    by_area = {}
    for p, s in grown.items():
        area = "/".join(Path(p).parts[:2]) if p.startswith(".dvc") else Path(p).parts[0]
        by_area[area] = by_area.get(area, 0) + s
    doc = {
        "snapshot": str(snapshot),
        "snapshot_bytes": snap_bytes,
        "repro_seconds": round(seconds, 1),
        "written_bytes": written,
        "tree_bytes": sum(grown.values()),
        "tree_bytes_by_area": dict(sorted(by_area.items())),
        "largest_new_files": dict(sorted(grown.items(), key=lambda kv: -kv[1])[:8]),
        "method": "dvc repro load_model in a clone of HEAD; written = getrusage(RUSAGE_CHILDREN).ru_oublock "
        "x 512 over the dvc process tree; tree = apparent sizes after - before",
    }
    print(json.dumps(doc, indent=2))
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
