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


def _splits(root, params):
    cal = prepare_calibration(params, root / "cal", root / "selection", root / "test")
    return {
        "calibration": cal,
        "selection": load_calibration(root / "selection", "selection")[1],
        "test": load_calibration(root / "test", "test")[1],
    }


def test_three_splits_are_disjoint_by_image_and_deterministic(tmp_path, cap_params):
    a = _splits(tmp_path / "a", cap_params)
    assert [len(a[s]) for s in a] == [cap_params.count, cap_params.selection_count, cap_params.test_count]
    images = {split: {r.image_id for r in records} for split, records in a.items()}
    assert not images["calibration"] & images["selection"]
    assert not images["calibration"] & images["test"]
    assert not images["selection"] & images["test"]
    for split in ("selection", "test"):
        meta, _ = load_calibration(tmp_path / "a" / split, split)
        assert meta.split == split and meta.seed == cap_params.seed
    assert _splits(tmp_path / "b", cap_params) == a  # same params, same splits
    for split in ("cal", "selection", "test"):
        assert (tmp_path / "a" / split / "manifest.jsonl").read_bytes() == (
            tmp_path / "b" / split / "manifest.jsonl"
        ).read_bytes()
    other = _splits(tmp_path / "c", replace(cap_params, seed=1))
    assert {r.image_id for r in other["test"]} != images["test"]
    # the calibration sample does not depend on the held-out sizes (the sensitivity pass stays cached)
    fewer = _splits(tmp_path / "d", replace(cap_params, selection_count=2, test_count=3))
    assert fewer["calibration"] == a["calibration"]
    with pytest.raises(InputError, match=r"the calibration split expected, got the selection split"):
        load_calibration(tmp_path / "a/selection")
    with pytest.raises(InputError, match=r"the selection split expected, got the test split"):
        load_calibration(tmp_path / "a/test", "selection")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"selection_count": 15},
            r"captions.selection_count: expected at most 14 \(images with captions outside the calibration "
            r"sample \(captions.count\)\), got 15",
        ),
        (
            {"test_count": 9},
            r"captions.test_count: expected at most 8 \(images with captions outside the calibration sample "
            r"and the selection split \(captions.count \+ selection_count\)\), got 9",
        ),
    ],
)
def test_held_out_counts_larger_than_what_the_sample_leaves_are_param_errors(
    tmp_path, cap_params, changes, message
):
    """20 images: count 6 + selection_count + test_count must fit; nothing is written."""
    with pytest.raises(InputError, match=message):
        prepare_calibration(
            replace(cap_params, **changes), tmp_path / "cal", tmp_path / "sel", tmp_path / "test"
        )
    assert not any(tmp_path.iterdir())
