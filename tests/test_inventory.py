import json

import pytest
from torch import nn

from op_sensitivity.errors import InputError
from op_sensitivity.inventory import (
    check_ops_in_model,
    module_name,
    op_inventory,
    read_inventory,
    tower_of,
    write_inventory,
)


def test_inventory_names_and_towers():
    assert tower_of("model.visual.blocks.0.attn.qkv") == "vision"
    assert tower_of("lm_head") == "lm_head"
    assert tower_of("model.language_model.layers.3.mlp.up_proj") == "text"
    assert module_name("lm_head.module") == "lm_head"
    assert module_name("model.visual.merger.mlp.0") == "model.visual.merger.mlp.0"


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(ops={}), "expected an object with a list 'ops'"),
        (lambda d: d.update(ops=[]), "no ops"),
        (lambda d: d["ops"].__setitem__(0, "0"), r"ops\[0\]: expected an object"),
        (lambda d: d["ops"][0].update(extra=1), r"ops\[0\]: unknown key 'extra'"),
        (lambda d: d["ops"][1].pop("type"), r"ops\[1\].type: missing"),
        (lambda d: d["ops"][0].update(params=True), r"ops\[0\].params: expected int"),
        (lambda d: d["ops"][0].update(shape=["3"]), r"ops\[0\].shape: expected a list of sizes"),
        (lambda d: d["ops"][0].update(tower="audio"), r"ops\[0\].tower: expected one of"),
        (lambda d: d["ops"][1].update(name="0"), r"ops\[1\]: '0' listed twice"),
        (lambda d: d.update(schema_version=1), "schema_version 2 expected"),
    ],
)
def test_a_damaged_inventory_is_named_with_its_field(tmp_path, edit, message):
    path = tmp_path / "op_inventory.json"
    write_inventory(op_inventory(_model()), "toy", path)
    assert [op.name for op in read_inventory(path)] == ["0", "2"]
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=message):
        read_inventory(path)


def test_an_inventory_op_the_model_lacks_is_named():
    ops = op_inventory(_model())
    check_ops_in_model(ops, _model(), "inv.json")
    with pytest.raises(InputError, match=r"inv.json: ops\[1\] '2' is not a module of the model"):
        check_ops_in_model(ops, nn.Sequential(nn.Linear(2, 3)), "inv.json")
    with pytest.raises(InputError, match=r"inv.json: ops\[0\] '0' is a Conv1d in the model, the inventory"):
        check_ops_in_model(ops, nn.Sequential(nn.Conv1d(2, 3, 1), nn.ReLU(), nn.Linear(3, 1)), "inv.json")
