from op_sensitivity.inventory import module_name, tower_of


def test_inventory_names_and_towers():
    assert tower_of("model.visual.blocks.0.attn.qkv") == "vision"
    assert tower_of("lm_head") == "lm_head"
    assert tower_of("model.language_model.layers.3.mlp.up_proj") == "text"
    assert module_name("lm_head.module") == "lm_head"
    assert module_name("model.visual.merger.mlp.0") == "model.visual.merger.mlp.0"
