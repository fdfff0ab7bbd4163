import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from op_sensitivity.data.calibration import prepare_calibration
from op_sensitivity.data.coco import draw_sample, load_coco
from op_sensitivity.errors import InputError
from tests.helpers import SAMPLE_ANNOTATIONS, SAMPLE_IMAGES


@pytest.fixture
def cap_params(repo_params):
    return replace(repo_params.captions, annotations=SAMPLE_ANNOTATIONS, images_dir=SAMPLE_IMAGES, count=6)


def _pairs(coco, **kw):
    return [(img["id"], ann["id"]) for img, ann in draw_sample(coco, **kw)]


def test_shipped_sample_is_coco_2017_captions_schema():
    doc = json.loads(SAMPLE_ANNOTATIONS.read_text())
    assert set(doc) == {"info", "licenses", "images", "annotations"}
    assert len(doc["images"]) >= 16
    for img in doc["images"]:
        assert {"id", "file_name", "width", "height"} <= set(img)
        with Image.open(SAMPLE_IMAGES / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"])
    assert all(set(a) == {"id", "image_id", "caption"} for a in doc["annotations"])


def test_sampling_is_deterministic_and_seed_dependent():
    coco = load_coco(SAMPLE_ANNOTATIONS)
    a = _pairs(coco, count=8, seed=0, captions_per_image="one")
    assert a == _pairs(coco, count=8, seed=0, captions_per_image="one")
    assert a != _pairs(coco, count=8, seed=1, captions_per_image="one")
    assert len({img for img, _ in a}) == 8  # one caption per image: distinct images
    for img, ann in a:
        assert coco.anns[ann]["image_id"] == img


def test_all_captions_per_image_takes_every_caption_of_drawn_images():
    coco = load_coco(SAMPLE_ANNOTATIONS)
    pairs = _pairs(coco, count=7, seed=3, captions_per_image="all")
    assert len(pairs) == 7
    first_image = pairs[0][0]
    n_first = len(coco.getAnnIds(imgIds=[first_image]))
    assert [img for img, _ in pairs[:n_first]] == [first_image] * n_first


def test_count_larger_than_data_is_a_param_error():
    coco = load_coco(SAMPLE_ANNOTATIONS)
    with pytest.raises(
        InputError, match=r"captions.count: expected at most 20 \(images with captions\), got 21"
    ):
        draw_sample(coco, count=21, seed=0, captions_per_image="one")


def _bad_annotations(tmp_path: Path, mutate) -> Path:
    doc = json.loads(SAMPLE_ANNOTATIONS.read_text())
    mutate(doc)
    path = tmp_path / "captions_bad.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("annotations"), "field 'annotations' missing or not a list"),
        (
            lambda d: d["annotations"][0].pop("caption"),
            "annotations[0]: expected an object with integer 'id'",
        ),
        (lambda d: d["images"][2].update(id="x"), "images[2]: expected an object with integer 'id'"),
        (
            lambda d: d["annotations"].append({"id": 999, "image_id": 12345, "caption": "x"}),
            "refer to image ids missing",
        ),
    ],
)
def test_schema_errors_name_file_and_field(tmp_path, cap_params, mutate, message):
    path = _bad_annotations(tmp_path, mutate)
    with pytest.raises(InputError) as err:
        prepare_calibration(replace(cap_params, annotations=path), tmp_path / "out")
    assert str(path) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_not_json_and_missing_file(tmp_path, cap_params):
    bad = tmp_path / "captions.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        prepare_calibration(replace(cap_params, annotations=bad), tmp_path / "out")
    with pytest.raises(InputError, match="annotation file not found"):
        prepare_calibration(replace(cap_params, annotations=tmp_path / "none.json"), tmp_path / "out")
