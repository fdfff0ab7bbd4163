"""Stage prepare_captions: COCO captions file + images -> calibration sample directory."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from op_sensitivity.cli import run_stage
from op_sensitivity.data.calibration import prepare_calibration
from op_sensitivity.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/calibration", type=Path)
    ap.add_argument("--eval-out", default="data/eval", type=Path, help="the held-out evaluation split")
    args = ap.parse_args(argv)
    params = load_params(args.params).captions
    records = prepare_calibration(params, args.out, args.eval_out)
    logging.getLogger("prepare_captions").info(
        "wrote %d calibration and %d eval image+caption pairs (%s, mode %s) to %s and %s",
        len(records),
        params.eval_count,
        params.captions_per_image,
        params.mode,
        args.out,
        args.eval_out,
    )


if __name__ == "__main__":
    run_stage(main)
