"""One pass specification for both engines: bounds, exclusions and their reasons, checked once."""

import pytest

from op_sensitivity.engines.contract import FP32, build_spec, check_op_dicts, exclusion_reason
from op_sensitivity.errors import InputError
from op_sensitivity.inventory import read_inventory
from tests.helpers import EXCLUDE, EXCLUDED, sensitivity_params


@pytest.fixture(scope="module")
def inventory(small_model_dir):
    return read_inventory(small_model_dir.parent / "op_inventory.json")


def test_spec_keeps_module_order_and_the_confidence_batches(inventory):
    batches = [{"i": 0}, {"i": 1}, {"i": 2}]
    spec = build_spec(
        sensitivity_params(confidence_batches=2, op_name_dict=EXCLUDE), inventory, batches, "image_caption"
    )
    assert spec.module_order == [o.name for o in inventory]
    assert spec.batches == ({"i": 0}, {"i": 1}) and spec.confidence_batches == 2
    assert {e.op_name for e in spec.excluded} == EXCLUDED
    assert [k[0] for k in spec.scored] == [o.name for o in inventory if o.name not in EXCLUDED]
    assert {e.reason for e in spec.excluded} == {
        f"kept fp32 by sensitivity.op_name_dict[{k!r}]" for k in EXCLUDE
    }


def test_bounds_are_checked_before_any_work(inventory):
    with pytest.raises(InputError, match="sensitivity.max_ops: the pass would score 17 ops"):
        build_spec(sensitivity_params(max_ops=5), inventory, [{}], "image_caption")
    with pytest.raises(InputError, match=r"other.yaml: sensitivity.confidence_batches: expected at most 1"):
        build_spec(
            sensitivity_params(confidence_batches=2, params_file="other.yaml"),
            inventory,
            [{}],
            "image_caption",
        )
    everything = {".*": FP32}
    with pytest.raises(InputError, match="every op is kept fp32"):
        build_spec(sensitivity_params(op_name_dict=everything), inventory, [{}], "image_caption")


def test_text_only_keeps_the_vision_tower_fp32(inventory):
    spec = build_spec(sensitivity_params(), inventory, [{}], "text_only")
    vision = {o.name for o in inventory if o.tower == "vision"}
    assert {e.op_name for e in spec.excluded} == vision and len(vision) == 8
    assert all("op_name_dict" in e.reason for e in spec.excluded)
    assert r"model\.visual\..*" in spec.params.op_name_dict  # what INC is handed


def test_exclusion_rule_matches_names_regexes_and_types():
    int8 = {"weight": {"dtype": ["int8"]}}
    assert exclusion_reason("lm_head", "Linear", {}, {"lm_head.module": FP32}) is not None  # INC's name
    assert exclusion_reason("lm_head", "Linear", {}, {"lm_head": int8}) is None  # not fp32: not excluded
    assert exclusion_reason("model.visual.blocks.0.mlp.up_proj", "Linear", {}, EXCLUDE) is not None
    assert exclusion_reason("model.visual.blocks.1.mlp.up_proj", "Linear", {}, EXCLUDE) is None
    assert exclusion_reason("x", "Embedding", {"Embedding": FP32}, {}) == (
        "kept fp32 by sensitivity.op_type_dict['Embedding']"
    )


def test_op_dict_keys_must_match_an_op_as_inc_matches_them(inventory):
    """INC ignores a key that matches nothing (re.fullmatch on its op names): refused before any work."""
    ok = {
        "lm_head": FP32,
        "lm_head.module": FP32,  # INC's name of a wrapped module
        r"model\.visual\.blocks\.0\..*": FP32,
        r"model\.language_model\.layers\.0\.mlp\.(gate|up)_proj": {"weight": {"dtype": ["int8"]}},
    }
    check_op_dicts(sensitivity_params(op_name_dict=ok, op_type_dict={"Conv3d": FP32}), inventory, "inv.json")
    for key in ("lm_hed", r"model\.visual", "visual.*", r"model\.visual\.blocks\.9\..*"):
        with pytest.raises(
            InputError,
            match=r"params.yaml: sensitivity.op_name_dict\..*: matches no op of the "
            r"model \(17 ops in inv.json; e.g. 'model.visual",
        ):
            check_op_dicts(sensitivity_params(op_name_dict={key: FP32}), inventory, "inv.json")
    with pytest.raises(
        InputError,
        match=r"sensitivity.op_type_dict.Conv2d: matches no op type of the model "
        r"\(17 ops in inv.json, of types Conv3d, Embedding, Linear\)",
    ):
        check_op_dicts(sensitivity_params(op_type_dict={"Conv2d": FP32}), inventory, "inv.json")
