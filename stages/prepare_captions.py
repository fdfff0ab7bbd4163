"""Stage prepare_captions: COCO captions file + images -> calibration sample, selection and test splits."""

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
    ap.add_argument(
        "--selection-out",
        default="data/selection",
        type=Path,
        help="the held-out split the curve and the measured keep-list policies read",
    )
    ap.add_argument(
        "--test-out", default="data/test", type=Path, help="the held-out split only validate reads"
    )
    args = ap.parse_args(argv)
    params = load_params(args.params).captions
    records = prepare_calibration(params, args.out, args.selection_out, args.test_out)
    logging.getLogger("prepare_captions").info(
        "wrote %d calibration, %d selection and %d test image+caption pairs (%s, mode %s) to %s, %s and %s",
        len(records),
        params.selection_count,
        params.test_count,
        params.captions_per_image,
        params.mode,
        args.out,
        args.selection_out,
        args.test_out,
    )


if __name__ == "__main__":
    run_stage(main)
