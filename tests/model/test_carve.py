import pytest

from op_sensitivity.model import full_size
from op_sensitivity.model.carve import carved_full_size


def test_carved_full_size_cuts_the_depth_of_the_published_config_and_only_inside():
    published = full_size.full_size_config(None, "3b")
    with carved_full_size(2, 1):
        # looked up the way build_full_size_model looks it up: the module's global, at call time
        carved = full_size.build_full_size_model.__globals__["full_size_config"](None, "3b")
    after = full_size.full_size_config(None, "3b")
    assert (carved.text_config.num_hidden_layers, carved.vision_config.depth) == (2, 1)
    assert carved.vision_config.fullatt_block_indexes == []  # the 3B's first full-attention block is 7
    assert carved.text_config.hidden_size == published.text_config.hidden_size == 2048
    assert carved.text_config.vocab_size == published.text_config.vocab_size == 151936
    assert (after.text_config.num_hidden_layers, after.vision_config.depth) == (36, 32)


def test_carved_full_size_restores_the_published_config_when_the_build_fails():
    with pytest.raises(RuntimeError, match="build failed"), carved_full_size(1, 1):
        raise RuntimeError("build failed")
    config = full_size.full_size_config(None, "3b")
    assert (config.text_config.num_hidden_layers, config.vision_config.depth) == (36, 32)
