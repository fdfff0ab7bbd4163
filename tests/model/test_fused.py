import torch
from torch import nn

from op_sensitivity.inventory import read_inventory
from op_sensitivity.model.fused import fused_groups


def test_inventory_names_the_groups_runtimes_fuse(small_model_dir):
    groups = {o.name: o.fused_group for o in read_inventory(small_model_dir.parent / "op_inventory.json")}
    attn = "model.language_model.layers.0.self_attn"
    mlp = "model.language_model.layers.0.mlp"
    assert {groups[f"{attn}.{p}"] for p in ("q_proj", "k_proj", "v_proj")} == {
        f"{attn}.{{k_proj,q_proj,v_proj}}"
    }
    assert groups[f"{mlp}.gate_proj"] == groups[f"{mlp}.up_proj"] == f"{mlp}.{{gate_proj,up_proj}}"
    assert groups["model.visual.blocks.0.mlp.gate_proj"] == "model.visual.blocks.0.mlp.{gate_proj,up_proj}"
    # Not fused: an already-fused qkv, projections fed other tensors, the head and the embedding.
    for name in (f"{attn}.o_proj", f"{mlp}.down_proj", "model.visual.blocks.0.attn.qkv", "lm_head"):
        assert groups[name] is None, name
    assert groups["model.language_model.embed_tokens"] is None


class _Block(nn.Module):
    """Two siblings fed the same tensor, one fed a copy of it: only the first two fuse."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x.clone())


def test_groups_come_from_dataflow_not_names():
    assert fused_groups(_Block(), {"x": torch.ones(2, 4)}) == {"a": "{a,b}", "b": "{a,b}"}
