"""Stage load_model: tiny default or local HF snapshot -> HF model directory + op inventory."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from op_sensitivity.cli import run_stage
from op_sensitivity.inventory import op_inventory, write_inventory
from op_sensitivity.model.fused import fused_groups, probe_batch
from op_sensitivity.model.source import materialize_model
from op_sensitivity.params import load_params


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/qwen2_5_vl", type=Path)
    ap.add_argument("--inventory", default="reports/model/op_inventory.json", type=Path)
    args = ap.parse_args(argv)
    params = load_params(args.params).model
    model, processor, card = materialize_model(params, args.out)
    groups = fused_groups(model, probe_batch(processor))
    doc = write_inventory(op_inventory(model, groups), card.model_type, args.inventory)
    logging.getLogger("load_model").info(
        "%s model (%d params, sha256 %s) -> %s; %d quantizable ops %s",
        card.source,
        card.params,
        card.sha256[:12],
        args.out,
        len(doc["ops"]),
        doc["totals"],
    )


if __name__ == "__main__":
    run_stage(main)
