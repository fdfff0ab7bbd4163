"""The forward probe and the trial cost model built on it."""

from __future__ import annotations

import json
from itertools import combinations

import pytest
import torch

from op_sensitivity.engines.numerics import resolve_numerics
from op_sensitivity.errors import InputError
from op_sensitivity.inventory import OpInfo
from op_sensitivity.model.full_size import full_size_config
from op_sensitivity.params import load_params
from op_sensitivity.plan.model import describe
from op_sensitivity.plan.probe import (
    UNITS,
    CostModel,
    ForwardCosts,
    probe,
    probe_config,
    typical_image,
    unit_of,
)
from tests.helpers import REPO
from tests.threads import torch_threads

OPS = [
    "model.visual.patch_embed.proj",
    "model.visual.blocks.0.mlp.down_proj",
    "model.visual.merger.mlp.2",
    "model.language_model.embed_tokens",
    "model.language_model.layers.0.mlp.down_proj",
    "model.language_model.layers.1.mlp.down_proj",
    "lm_head",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The module's values on one torch thread (as under xdist), the count given back after it."""
    with torch_threads(1):
        yield


def _costs(
    observe: float = 2.0, setup: float = 0.01, per_sample: float = 0.0, int8: float = 0.5
) -> ForwardCosts:
    """Every unit 1 s a call in float, ``int8`` s a call in int8, plus ``per_sample`` a sample."""
    return ForwardCosts(
        int8=dict.fromkeys(UNITS, (int8, per_sample)),
        fp32=dict.fromkeys(UNITS, (1.0, per_sample)),
        observe_factor=observe,
        setup_per_param=setup,
        device="cpu",
        arithmetic="inc_cpu int8_kernels",
        probe_seconds=0.0,
        image_tokens=0,
        text_tokens=0,
    )


def test_ops_sit_in_the_units_a_trial_recomputes():
    assert [unit_of(op) for op in OPS] == [
        ("vision_pre", 0),
        ("vision_block", 0),
        ("vision_post", 0),
        ("text_pre", 0),
        ("text_layer", 0),
        ("text_layer", 1),
        ("head", 0),
    ]


def test_pass_seconds_by_hand():
    """Seven units of one op each (10 params): fp32 1 s, int8 0.5 s per unit (docstring sums)."""
    ops = [OpInfo(name, "Linear", [1], 10, "text", None) for name in OPS]
    model = CostModel(_costs(), ops, layers=2, blocks=1)
    assert model.forward(set()) == 7.0 and model.forward(set(OPS)) == 3.5
    # once a pass: setup 0.01 x 70 (the int8 weights, kept across batches)
    assert model.setup_seconds(OPS) == pytest.approx(0.7)
    # once per batch: calibration 7 x 2 + fp32 reference 7 + all-int8 3.5 = 24.5;
    # fallback (all int8 from the op's unit on) 3.5+3+2.5+2+1.5+1+0.5 = 14;
    # requant (cumulative, from the op's unit on) 6.5+5.5+4.5+3.5+2.5+1.5+0.5 = 24.5
    assert model.pass_seconds(OPS, suffix_reuse=True) == pytest.approx(24.5 + 14.0 + 24.5)
    # no reuse: a vision op recomputes everything, a text op the text tower (its input is cached)
    # fallback 3.5 x 3 + 2 x 4 = 18.5; requant 6.5+6+5.5 + 3.5+3+2.5+2 = 29
    assert model.pass_seconds(OPS, suffix_reuse=False) == pytest.approx(24.5 + 18.5 + 29.0)
    # isolated requant: one op int8 at a time
    assert model.pass_seconds(OPS, True, requant_cumulative=False) == pytest.approx(
        24.5 + 14.0 + (6.5 + 5.5 + 4.5 + 3.5 + 2.5 + 1.5 + 0.5)
    )


def test_first_order_seconds_by_hand():
    """The same seven units: base 24.5 (as above); 2 sweeps of (fp32 7 + int8 3.5 + backward 2 x 7)
    = 49 and 3 probes of 14 = 42; 4 exact trials of the 14 at the exact trials' mean (38.5 / 14)."""
    ops = [OpInfo(name, "Linear", [1], 10, "text", None) for name in OPS]
    model = CostModel(_costs(), ops, layers=2, blocks=1)
    got = model.first_order_seconds(OPS, True, 1, points=2, probes=3, exact=4)
    assert got == pytest.approx(24.5 + 49.0 + 42.0 + 38.5 * 4 / 14)
    # every trial exact: the sweeps on top of the exact pass
    everything = model.first_order_seconds(OPS, True, 1, points=2, probes=3, exact=99)
    assert everything == pytest.approx(model.pass_seconds(OPS, True) + 49.0 + 42.0)


def test_a_forward_costs_per_call_plus_per_sample():
    """0.1 s per sample on top of each unit's per-call seconds: 7 units, fp32 (1 s per call)."""
    ops = [OpInfo(name, "Linear", [1], 10, "text", None) for name in OPS]
    model = CostModel(_costs(per_sample=0.1), ops, layers=2, blocks=1)
    assert model.forward(set(), samples=2) == pytest.approx(7 * (1.0 + 0.2))
    # 5 samples in forwards of 2: two calls of 2 and one of 1
    assert model.split_seconds(set(), 5, 2) == pytest.approx(2 * 7 * 1.2 + 7 * 1.1)
    assert model.split_seconds(set(), 4, 8) == pytest.approx(7 * 1.4)  # one call of 4


def test_the_typical_image_is_the_annotations_median_as_prepare_captions_shrinks_it(tmp_path):
    """The repo's sample: COCO thumbnails of at most 112 px, median 104 x 84 (train2017: ~640x480)."""
    params = load_params(REPO / "params.yaml")
    assert typical_image(params.captions.annotations, 0) == (104, 84)
    assert typical_image(params.captions.annotations, 52) == (52, 42)
    coco = tmp_path / "captions.json"
    coco.write_text(
        json.dumps({"images": [{"width": 640, "height": 480}, {"width": 480, "height": 640}] * 2})
    )
    assert typical_image(coco, 448) == (448, 448)  # the medians: 560 x 560, shrunk to 448
    with pytest.raises(InputError, match="no image sizes to plan with"):
        typical_image(tmp_path / "missing.json", 448)


def test_probe_config_is_one_layer_and_block_at_full_width_with_a_small_vocabulary():
    config = full_size_config(None, "3b")
    small, scale = probe_config(config)
    assert small.text_config.num_hidden_layers == 1 and small.vision_config.depth == 1
    assert small.text_config.hidden_size == 2048 and small.vision_config.hidden_size == 1280
    assert small.text_config.vocab_size == 16384 and scale == pytest.approx(151936 / 16384)
    assert {small.image_token_id, small.vision_start_token_id} <= set(range(16384))


def test_probe_of_the_embedded_default_times_every_unit_in_both_states():
    params = load_params(REPO / "params.yaml")
    facts = describe(params.model)
    costs = probe(
        facts.config, torch.float32, resolve_numerics(params.sensitivity), (224, 224), (3136, 12544)
    )
    assert set(costs.int8) == set(costs.fp32) == set(UNITS)
    assert all(v >= 0 for pair in [*costs.int8.values(), *costs.fp32.values()] for v in pair)
    assert costs.seconds("fp32", "text_layer", 1) > 0 and costs.seconds("int8", "vision_block", 1) > 0
    assert costs.observe_factor > 0
    assert costs.image_tokens == 16 and costs.text_tokens == 42  # 112x112 at most: 64 patches, 2x2 merged
    assert costs.arithmetic == "inc_cpu int8_kernels" and costs.device == "cpu"
    model = CostModel(costs, facts.ops, 2, 2)
    assert model.pass_seconds([op.name for op in facts.ops], True) > 0


def test_the_dearest_configuration_bounds_every_kept_list_of_its_size():
    """Units of unequal ops: a decoder layer of two ops (10 and 30 params) and lm_head (40), the
    rest of one op each. The bound is the all-int8 split plus the largest additions; every kept
    list of that size costs at most that, and the dearest one costs exactly that."""
    params = {"model.language_model.layers.0.mlp.down_proj": 30, "lm_head": 40}
    names = [*OPS, "model.language_model.layers.0.mlp.up_proj"]
    ops = [OpInfo(n, "Linear", [1], params.get(n, 10), "text", None) for n in names]
    costs = _costs(per_sample=0.1)
    costs.fp32["head"] = (3.0, 0.1)  # lm_head: float 3 s a call against 0.5 int8
    model = CostModel(costs, ops, layers=2, blocks=1)
    # 5 samples in forwards of 2 (two calls of 2, one of 1): the all-int8 split
    floor = model.split_seconds(set(names), 5, 2)
    # by hand: keeping lm_head adds (3 - 0.5) per call, 3 calls = 7.5; then a one-op unit its whole
    # (1 - 0.5) x 3 = 1.5 (down_proj, the larger op, adds only its 30/40 of its layer's: 1.125)
    assert model.dearest_split_seconds(names, 0, 5, 2) == pytest.approx(floor)
    assert model.dearest_split_seconds(names, 1, 5, 2) == pytest.approx(floor + 7.5)
    assert model.dearest_split_seconds(names, 2, 5, 2) == pytest.approx(floor + 7.5 + 1.5)
    for k in range(len(names) + 1):
        bound = model.dearest_split_seconds(names, k, 5, 2)
        costs_k = [model.split_seconds(set(names) - set(kept), 5, 2) for kept in combinations(names, k)]
        assert max(costs_k) == pytest.approx(bound)  # attained, never exceeded
    # under fake quant the int8 op may be the dearer: keeping it then saves; the bound keeps the cheapest
    slow = _costs()
    slow.int8.update(dict.fromkeys(UNITS, (2.0, 0.0)))
    model = CostModel(slow, ops, layers=2, blocks=1)
    for k in range(len(names) + 1):
        costs_k = [model.split_seconds(set(names) - set(kept), 1, 1) for kept in combinations(names, k)]
        assert max(costs_k) == pytest.approx(model.dearest_split_seconds(names, k, 1, 1))
