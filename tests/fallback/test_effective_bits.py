"""Effective weight bits count a kept op at the dtype the model stores it in (the inventory's
``weight_dtype``), which is what the checkpoints keep: 16 bits for a bf16 model, not 32."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from op_sensitivity.engines.artifact import read_report
from op_sensitivity.errors import InputError
from op_sensitivity.fallback.keep_list import build_fallback
from op_sensitivity.fallback.policy import choose
from op_sensitivity.inventory import cost, op_inventory, read_inventory, weight_bits, write_inventory
from op_sensitivity.report.scores import phase_scores, select_phase
from tests.handmade import DOWN, HEAD, INVENTORY, PATCH, UP, fallback_params, make_curve, make_report

BF16 = [replace(op, weight_dtype="bfloat16") for op in INVENTORY]  # 1300 params, as published


def test_a_bf16_model_keeps_its_ops_at_16_bits():
    """DOWN + HEAD kept (700 of 1300 params): 16 x 700 + 8 x 600 bits, where float32 storage
    (the tiny model) costs 32 x 700 + 8 x 600."""
    bf16 = cost({DOWN, HEAD}, BF16)
    assert bf16["effective_weight_bits"] == round((16 * 700 + 8 * 600) / 1300, 4) == 12.3077
    assert bf16["kept_weight_bits"] == 16
    f32 = cost({DOWN, HEAD}, INVENTORY)
    assert f32["effective_weight_bits"] == 20.9231 and f32["kept_weight_bits"] == 32
    assert cost(set(), BF16)["effective_weight_bits"] == 8.0
    assert cost({op.name for op in BF16}, BF16)["effective_weight_bits"] == 16.0
    # a model of mixed dtypes: each kept op at its own bits; kept_weight_bits their weighted mean
    mixed = [replace(op, weight_dtype="bfloat16") if op.name == DOWN else op for op in INVENTORY]
    both = cost({DOWN, HEAD}, mixed)
    assert both["effective_weight_bits"] == round((16 * 400 + 32 * 300 + 8 * 600) / 1300, 4)
    assert both["kept_weight_bits"] == round((16 * 400 + 32 * 300) / 700, 4)


def test_the_keep_list_names_the_bits_it_counted(tmp_path):
    path = tmp_path / "op_sensitivity.json"
    path.write_text(json.dumps(make_report()))
    doc = build_fallback(read_report(path), path, BF16, fallback_params(policy="top_k", top_k={"k": 2}))
    assert [o["module"] for o in doc["ops"]] == [DOWN, HEAD]
    assert doc["totals"]["kept_weight_bits"] == 16
    assert doc["totals"]["effective_weight_bits"] == 12.3077


def _bits_budget(inventory, bits):
    p = fallback_params(policy="bits_budget", bits_budget={"metric": "kl", "bits": bits}, always_keep=[])
    df = select_phase(phase_scores(make_report(), inventory), p.phase)
    return sorted(choose(df, p, make_curve(), inventory)["module"])


def test_bits_budget_spends_the_stored_bits():
    """14 effective bits: float32 storage leaves (14 - 8) / 24 of the params, 325: PATCH + UP (the
    hand-checked knapsack of test_policy); bf16 storage leaves (14 - 8) / 8 of them, 975: DOWN +
    PATCH + UP (700 params, damage 1.05; every 4-op set is 1000 or more). 15 bits on bf16 leave
    1137 params: every op but EMBED (1000 params, the least damage); on float32 that is 431."""
    assert _bits_budget(INVENTORY, 14.0) == sorted([PATCH, UP])
    assert _bits_budget(BF16, 14.0) == sorted([DOWN, PATCH, UP])
    assert cost({DOWN, PATCH, UP}, BF16)["effective_weight_bits"] <= 14.0
    assert _bits_budget(BF16, 15.0) == sorted([DOWN, HEAD, PATCH, UP])
    assert _bits_budget(INVENTORY, 15.0) == sorted([PATCH, UP])


def test_the_inventory_records_the_stored_dtype(tmp_path):
    """A real module tree in bf16 (as a published checkpoint loads with dtype auto) and its
    inventory read back; an inventory without the field, or with a dtype torch lacks, is refused."""
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6), nn.Linear(6, 10)).to(torch.bfloat16)
    ops = op_inventory(model)
    assert {op.weight_dtype for op in ops} == {"bfloat16"} and {weight_bits(op) for op in ops} == {16}
    path = tmp_path / "op_inventory.json"
    write_inventory(ops, "toy", path)
    assert read_inventory(path) == ops
    assert [weight_bits(op) for op in op_inventory(model.float())] == [32, 32, 32]
    doc = json.loads(path.read_text())
    for bad, message in ((None, r"ops\[0\].weight_dtype: missing"), ("int8", "a torch floating dtype")):
        if bad is None:
            del doc["ops"][0]["weight_dtype"]
        else:
            doc["ops"][0]["weight_dtype"] = bad
        path.write_text(json.dumps(doc))
        with pytest.raises(InputError, match=message):
            read_inventory(path)
