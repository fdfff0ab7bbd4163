"""The embedded default exactly as `make repro` runs it (29 ops, 2 confidence batches): slow."""

import json

import pytest

from tests.helpers import copy_repo, run


@pytest.mark.slow
def test_default_params_repro_scores_every_op(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    run(["dvc", "repro"], repo)
    report = json.loads((repo / "reports/sensitivity/op_sensitivity.json").read_text())
    inventory = json.loads((repo / "reports/model/op_inventory.json").read_text())
    assert len(inventory["ops"]) == 29
    for phase in ("fallback", "requant"):
        ops = report["phases"][phase]["ops"]
        assert len(ops) == 29 and all(len(o["mse_per_batch"]) == 2 for o in ops)
    fallback = json.loads((repo / "reports/fallback/fallback_ops.json").read_text())
    assert fallback["ops"] and fallback["ops"][0]["rank"] == 1
