"""compressed-tensors (the library llm-compressor and vLLM read W8A8 checkpoints with) applies our
llm-compressor recipe and ignore list to the real model: exactly the listed modules stay unquantized.

llm-compressor itself pins transformers<=5.17 and cannot sit beside this project; the recipe's
QuantizationModifier hands its scheme, targets and ignore list to compressed-tensors' config.
"""

import pytest
import yaml

from op_sensitivity.fallback.exports import llmcompressor_ignore, llmcompressor_recipe
from op_sensitivity.inventory import read_inventory
from op_sensitivity.model.source import load_model_dir

ct = pytest.importorskip("compressed_tensors.quantization", reason="compressed-tensors not installed (.[ct])")


def _applied(model, recipe: dict) -> set[str]:
    modifier = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    scheme = ct.preset_name_to_scheme(modifier["scheme"], modifier["targets"])
    config = ct.QuantizationConfig(config_groups={"group_0": scheme}, ignore=modifier["ignore"])
    ct.apply_quantization_config(model, config, show_progress=False)
    return {name for name, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}


def test_the_ignore_list_keeps_exactly_the_listed_modules_unquantized(small_model_dir):
    inventory = read_inventory(small_model_dir.parent / "op_inventory.json")
    linear = {op.name for op in inventory if op.type == "Linear"}
    layer = [op.name for op in inventory if op.name.startswith("model.language_model.layers.0.")]
    keep = [*layer, "lm_head", "model.visual.merger.mlp.0"]
    ignore = llmcompressor_ignore(keep, inventory)
    assert r"re:model\.language_model\.layers\.0\..*" in ignore  # a whole decoder layer collapsed
    recipe = yaml.safe_load(yaml.safe_dump(llmcompressor_recipe(ignore)))  # as the stage writes it
    model, _, _ = load_model_dir(small_model_dir)
    assert _applied(model, recipe) == linear - set(keep)
    model, _, _ = load_model_dir(small_model_dir)
    assert _applied(model, llmcompressor_recipe([])) == linear  # nothing ignored: every Linear
