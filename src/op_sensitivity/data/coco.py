"""COCO 2017 captions: validate the file, index it with pycocotools, draw a deterministic sample.

Why validate before pycocotools: it indexes whatever JSON it is given and fails later with a
KeyError; a wrong file (instances instead of captions, a truncated download) should be named
with the field that is off.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pycocotools.coco import COCO

from ..errors import InputError, require


def load_coco(path: Path) -> COCO:
    """Validate the COCO 2017 captions schema, then index it with pycocotools."""
    require(path.is_file(), path, "annotation file not found (expected a COCO captions_*.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    require(isinstance(data, dict), path, "expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        require(
            isinstance(data.get(key), list),
            path,
            f"field '{key}' missing or not a list (COCO captions schema)",
        )
    for i, img in enumerate(data["images"]):
        ok = (
            isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
        )
        require(
            ok, path, f"images[{i}]: expected an object with integer 'id' and string 'file_name', got {img!r}"
        )
    for i, ann in enumerate(data["annotations"]):
        ok = (
            isinstance(ann, dict)
            and isinstance(ann.get("id"), int)
            and isinstance(ann.get("image_id"), int)
            and isinstance(ann.get("caption"), str)
        )
        require(
            ok,
            path,
            f"annotations[{i}]: expected an object with integer 'id', integer 'image_id' and "
            f"string 'caption' (a captions file, not instances/keypoints), got {ann!r}",
        )
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    known = set(coco.imgs)
    orphans = [a["id"] for a in data["annotations"] if a["image_id"] not in known]
    require(not orphans, path, f"annotations {orphans[:5]} refer to image ids missing from 'images'")
    return coco


def _captioned_images(coco: COCO) -> list[int]:
    return sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=[i]))


def _draw(
    coco: COCO,
    pool: list[int],
    count: int,
    rng: random.Random,
    captions_per_image: str,
    where: str,
    what: str,
) -> list[tuple[dict, dict]]:
    pairs: list[tuple[dict, dict]] = []
    if captions_per_image == "one":
        if count > len(pool):
            raise InputError(f"{where}: expected at most {len(pool)} ({what}), got {count}")
        for image_id in rng.sample(pool, count):
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
            pairs.append((coco.imgs[image_id], rng.choice(anns)))
        return pairs
    for image_id in rng.sample(pool, len(pool)):
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
        pairs.extend((coco.imgs[image_id], ann) for ann in anns[: count - len(pairs)])
        if len(pairs) == count:
            return pairs
    raise InputError(f"{where}: expected at most {len(pairs)} (captions available), got {count}")


def draw_sample(
    coco: COCO, count: int, seed: int, captions_per_image: str, where: str = "captions.count"
) -> list[tuple[dict, dict]]:
    """Pick ``count`` (image, annotation) pairs; the same file, seed and mode always give the same pairs.

    ``where`` names the count param in errors (``CaptionsParams.where("count")``).
    """
    pool = _captioned_images(coco)
    return _draw(coco, pool, count, random.Random(seed), captions_per_image, where, "images with captions")


def draw_held_out(
    coco: COCO,
    taken: list[tuple[dict, dict]],
    count: int,
    seed: int,
    split: str,
    captions_per_image: str,
    where: str,
    outside: str,
) -> list[tuple[dict, dict]]:
    """A held-out split (``selection``, ``test``): ``count`` pairs from images ``taken`` does not use.

    Disjoint by image, so no picture an earlier split holds is scored again; its own random stream
    (seeded by the split's name and ``seed``), so the split depends on the earlier ones only
    through the images they take. ``outside`` names them in the error ("the calibration sample").
    """
    used = {img["id"] for img, _ in taken}
    pool = [i for i in _captioned_images(coco) if i not in used]
    rng = random.Random(f"{split}-{seed}")
    return _draw(coco, pool, count, rng, captions_per_image, where, f"images with captions outside {outside}")
