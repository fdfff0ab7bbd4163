"""The serving graph (``quantize.onnx_serving``) on the embedded default's sizes (2 vision blocks:
one windowed, one full; 2 decoder layers): traced on one batch, it gives transformers' logits on
every other layout of the test split, in torch and in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from op_sensitivity.data.calibration import load_calibration
from op_sensitivity.errors import InputError
from op_sensitivity.model.batches import build_eval_batches
from op_sensitivity.model.source import load_config, load_model_dir
from op_sensitivity.quantize.onnx_export import module_nodes, session, signature
from op_sensitivity.quantize.onnx_serving import (
    AXES,
    TEXT_INPUTS,
    VISION_INPUTS,
    export_serving,
    graph_inputs,
    serving_forwards,
)

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (.[ort])")

import onnx  # noqa: E402  (after the skip)


@pytest.fixture(scope="module")
def served(default_model_dir, test_dir, tmp_path_factory):
    model, processor, _ = load_model_dir(default_model_dir)
    model = model.float().eval()
    meta, records = load_calibration(test_dir, "test")
    batches = [b for b, _ in build_eval_batches(records, test_dir, processor, meta.mode, 2)]
    # the captions, and by them the token layouts, differ per batch
    assert len({signature(b) for b in batches}) == len(batches) == 3
    assert len({str(b["image_grid_thw"].tolist()) for b in batches}) > 1  # and so do the image grids
    config = load_config(default_model_dir)
    path = tmp_path_factory.mktemp("serving") / "model.onnx"
    names = export_serving(model, config, batches[0], path, large=False)
    with torch.no_grad():
        reference = [model(**b, use_cache=False).logits for b in batches]
    return model, config, batches, path, names, reference


def test_the_glue_gives_what_the_model_computes_inside(served):
    """The 3-D positions equal the model's own (``compute_3d_position_ids``), image tokens spread
    over height and width; the window index permutes the merged patches."""
    model, config, batches, *_ = served
    for b in batches:
        feeds = graph_inputs(config, b)
        own = model.model.compute_3d_position_ids(
            input_ids=b["input_ids"],
            image_grid_thw=b["image_grid_thw"],
            video_grid_thw=None,
            inputs_embeds=None,
            attention_mask=b["attention_mask"],
            cache=None,
            mm_token_type_ids=b["mm_token_type_ids"],
        )
        assert np.array_equal(feeds["position_ids"], own.numpy())
        image = feeds["input_ids"] == config.image_token_id
        assert len(np.unique(feeds["position_ids"][1][image])) > 1  # height varies over the image
        n = len(feeds["window_index"])
        assert sorted(feeds["window_index"].tolist()) == list(range(n))
        assert 4 * n == len(feeds["pixel_values"])
        assert feeds["cu_window_seqlens"][-1] == feeds["cu_seqlens"][-1] == len(feeds["pixel_values"])


def test_the_masked_vision_attention_equals_transformers_window_loop(served):
    """The block-diagonal mask against transformers' per-window calls: float summation order only."""
    model, config, batches, _, names, reference = served
    assert len(graph_inputs(config, batches[0])["cu_window_seqlens"]) > len(
        graph_inputs(config, batches[0])["cu_seqlens"]
    )  # the windowed block has more segments than images: the mask differs per block kind
    with torch.no_grad(), serving_forwards(model):
        for b, ref in zip(batches, reference, strict=True):
            feeds = graph_inputs(config, b)
            got = model(*(torch.from_numpy(feeds[k]) for k in names))
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # and the model is given back as it was
    assert "forward" not in vars(model) and "forward" not in vars(model.model)


def test_one_onnx_graph_serves_every_layout_of_the_test_split(served):
    """Traced on the first batch, the fp32 graph runs the other two (other lengths, other grids)
    and equals transformers to float rounding; every axis is dynamic."""
    _, config, batches, path, names, reference = served
    assert names == TEXT_INPUTS + VISION_INPUTS
    sess = session(path)
    for b, ref in zip(batches, reference, strict=True):
        logits = sess.run(["logits"], graph_inputs(config, b, names))[0]
        torch.testing.assert_close(torch.from_numpy(logits), ref, rtol=0, atol=2e-6)
    graph = onnx.load(str(path)).graph
    for i in [*graph.input, *graph.output]:
        named = {k for k, d in enumerate(i.type.tensor_type.shape.dim) if d.dim_param}
        assert named == set(AXES[i.name]), i.name  # e.g. position_ids: batch, sequence; not its 3
    # the scored ops keep their module-path node names (what nodes_to_exclude reads)
    linear = [n for n, m in served[0].named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d))]
    assert all(module_nodes(graph, linear).values())


def test_an_image_batch_without_its_grid_is_refused(served):
    _, config, batches, *_ = served
    bad = {k: v for k, v in batches[0].items() if k != "image_grid_thw"}
    with pytest.raises(InputError, match=r"image_grid_thw"):
        graph_inputs(config, bad)


def test_a_text_only_graph_serves_captions_of_other_lengths(served, default_model_dir, test_dir, tmp_path):
    """Mode ``text_only``: no vision inputs, positions numbered in sequence as the model numbers
    them without a grid (padding included); traced on one batch, the graph serves the others."""
    model, config, *_ = served
    _, processor, _ = load_model_dir(default_model_dir)
    _, records = load_calibration(test_dir, "test")
    batches = [b for b, _ in build_eval_batches(records, test_dir, processor, "text_only", 2)]
    assert "pixel_values" not in batches[0] and len({b["input_ids"].shape[1] for b in batches}) > 1
    assert any(bool((b["attention_mask"] == 0).any()) for b in batches)  # a padded caption
    path = tmp_path / "text.onnx"
    names = export_serving(model, config, batches[0], path, large=False)
    assert names == TEXT_INPUTS
    sess = session(path)
    for b in batches:
        with torch.no_grad():
            ref = model(**b, use_cache=False).logits
        logits = sess.run(["logits"], graph_inputs(config, b, names))[0]
        torch.testing.assert_close(torch.from_numpy(logits), ref, rtol=0, atol=2e-6)
