import json
from dataclasses import replace

import pytest
from PIL import Image

from op_sensitivity.data.calibration import load_calibration, prepare_calibration
from op_sensitivity.data.coco import draw_sample, load_coco
from op_sensitivity.errors import InputError
from tests.helpers import SAMPLE_ANNOTATIONS, SAMPLE_IMAGES


@pytest.fixture
def cap_params(repo_params):
    return replace(repo_params.captions, annotations=SAMPLE_ANNOTATIONS, images_dir=SAMPLE_IMAGES, count=6)


def test_prepare_writes_manifest_images_and_meta(tmp_path, cap_params):
    out = tmp_path / "cal"
    records = prepare_calibration(replace(cap_params, max_side=50), out)
    meta, loaded = load_calibration(out)
    assert loaded == records
    assert meta.count == 6 and meta.mode == "image_caption" and meta.max_side == 50
    for r in records:
        with Image.open(out / r.image) as im:
            assert max(im.size) == 50 and im.size == (r.width, r.height)
        assert r.caption  # caption text carried through
    doc = json.loads(SAMPLE_ANNOTATIONS.read_text())
    by_id = {a["id"]: a for a in doc["annotations"]}
    assert all(by_id[r.annotation_id]["image_id"] == r.image_id for r in records)


def test_missing_or_broken_image_fails_without_output(tmp_path, cap_params):
    images = tmp_path / "images"
    images.mkdir()
    coco = load_coco(SAMPLE_ANNOTATIONS)
    chosen = [img["file_name"] for img, _ in draw_sample(coco, 6, cap_params.seed, "one")]
    for name in chosen[:-1]:
        (images / name).write_bytes((SAMPLE_IMAGES / name).read_bytes())
    out = tmp_path / "out"
    with pytest.raises(InputError, match=f"{chosen[-1]}: image listed in .* is missing"):
        prepare_calibration(replace(cap_params, images_dir=images), out)
    (images / chosen[-1]).write_bytes(b"definitely not a jpeg")
    with pytest.raises(InputError, match=f"{chosen[-1]}: image listed in .* does not open"):
        prepare_calibration(replace(cap_params, images_dir=images), out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind


def test_failed_rerun_keeps_previous_output(tmp_path, cap_params):
    out = tmp_path / "out"
    prepare_calibration(cap_params, out)
    before = (out / "manifest.jsonl").read_text()
    with pytest.raises(InputError):
        prepare_calibration(replace(cap_params, images_dir=tmp_path / "missing"), out)
    assert (out / "manifest.jsonl").read_text() == before


def test_load_calibration_rejects_tampered_manifest(tmp_path, cap_params):
    out = tmp_path / "out"
    prepare_calibration(cap_params, out)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    rec["width"] = "wide"
    (out / "manifest.jsonl").write_text("\n".join([json.dumps(rec), *lines[1:]]))
    with pytest.raises(InputError, match=r"manifest.jsonl:1: field 'width' expected int"):
        load_calibration(out)


@pytest.mark.parametrize(
    ("breaks", "message"),
    [
        (lambda f: f.write_bytes(b""), "image of record 0 does not decode"),
        (
            lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
            "image of record 0 does not decode",
        ),
        (lambda f: Image.new("RGB", (7, 5)).save(f), "image of record 0 is 7x5, the manifest says"),
    ],
)
def test_load_calibration_decodes_every_image(tmp_path, cap_params, breaks, message):
    """An image emptied, cut short or replaced after prepare_captions: named when the split is read."""
    out = tmp_path / "out"
    records = prepare_calibration(cap_params, out)
    breaks(out / records[0].image)
    with pytest.raises(InputError, match=f"{records[0].image}: {message}"):
        load_calibration(out)


def test_eval_split_is_disjoint_by_image_and_deterministic(tmp_path, cap_params):
    a, b = tmp_path / "a", tmp_path / "b"
    cal = prepare_calibration(cap_params, a / "cal", a / "eval")
    prepare_calibration(cap_params, b / "cal", b / "eval")
    meta, held_out = load_calibration(a / "eval", "eval")
    assert meta.split == "eval" and meta.count == len(held_out) == cap_params.eval_count
    assert not {r.image_id for r in cal} & {r.image_id for r in held_out}
    assert load_calibration(b / "eval", "eval")[1] == held_out  # same params, same split
    assert (a / "eval/manifest.jsonl").read_bytes() == (b / "eval/manifest.jsonl").read_bytes()
    other = prepare_calibration(replace(cap_params, seed=1), tmp_path / "c/cal", tmp_path / "c/eval")
    assert {r.image_id for r in other} != {r.image_id for r in cal}
    with pytest.raises(InputError, match=r"the calibration split expected, got the eval split"):
        load_calibration(a / "eval")


def test_eval_count_larger_than_what_calibration_leaves_is_a_param_error(tmp_path, cap_params):
    with pytest.raises(
        InputError,
        match=r"captions.eval_count: expected at most 14 \(images with captions outside the calibration",
    ):
        prepare_calibration(replace(cap_params, eval_count=15), tmp_path / "cal", tmp_path / "eval")
    assert not (tmp_path / "cal").exists() and not (tmp_path / "eval").exists()
