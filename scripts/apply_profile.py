"""Apply a profile (a params overlay in profiles/) and -S overrides to params.yaml, validated whole.

    python scripts/apply_profile.py profiles/3b-gpu.yaml -S model.input=/models/Qwen2.5-VL-3B-Instruct
    make repro                      # prints the plan (op_sensitivity.plan), then dvc repro
    dvc exp run                     # or: the same params as a DVC experiment

What `dvc exp run -S key=value` does to params.yaml, for every key of the profile at once
(``op_sensitivity.plan.profile``): values written in place with comments kept, the result checked
with the library's params validation before the file is replaced (exit 2 and params.yaml
unchanged on a bad value). `git diff params.yaml` or `dvc params diff` shows what changed;
`git checkout params.yaml` goes back to the embedded default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from op_sensitivity.cli import run_stage
from op_sensitivity.plan.profile import apply, parse_overrides, read_profile


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path, help="a profiles/*.yaml overlay")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="on top of it")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    values = {**read_profile(args.profile), **parse_overrides(args.set)}
    changes = apply(args.params, values)
    for key, before, after in changes:
        print(f"{key}: {before!r} -> {after!r}")
    print(
        f"{args.params}: {len(changes)} values changed by {args.profile}; now `make repro` (plan, then DVC)"
    )


if __name__ == "__main__":
    run_stage(main)
