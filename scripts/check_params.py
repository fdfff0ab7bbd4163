"""Validate params.yaml and the paths it names before `dvc repro` touches anything.

    python scripts/check_params.py [params.yaml]

Why before DVC: a stage whose dep path is missing fails inside `dvc repro` only after DVC has
removed that stage's previous outputs. `make repro` runs this first, so a typo costs nothing.
Exit code 2 with one line naming the param on the first problem, 0 and a summary otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

from op_sensitivity.cli import run_stage
from op_sensitivity.errors import require
from op_sensitivity.fallback.exports import onnx_graph
from op_sensitivity.model.source import check_hf_dir
from op_sensitivity.params import load_params


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "params.yaml")
    p = load_params(path)
    c = p.captions
    require(c.annotations.is_file(), c.where("annotations"), f"{c.annotations} is not a file")
    require(c.images_dir.is_dir(), c.where("images_dir"), f"{c.images_dir} is not a directory")
    if p.model.source == "hf_dir":
        check_hf_dir(p.model.input, p.model.where("input"))
    onnx_graph(p.fallback.onnx_model, p.fallback.where("onnx_model"))
    print(f"{path}: ok (model source {p.model.source}, engine {p.sensitivity.engine})")


if __name__ == "__main__":
    run_stage(main)
