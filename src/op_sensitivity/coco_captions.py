"""Deterministic image+caption calibration samples from a COCO captions file.

Artifact (the output directory of stage ``prepare_captions``)::

    <out>/meta.json        CalibrationMeta: where the sample came from and how it was drawn
    <out>/manifest.jsonl   one CalibrationRecord per line, in sample order
    <out>/images/<file>    the chosen images (RGB JPEG; resized copies when max_side > 0)

Why a copy of the images: the sensitivity stage then depends only on this directory, so
DVC can cache and share the exact calibration inputs without the 18 GB COCO train set.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

from .atomic import atomic_dir
from .errors import InputError
from .params import CaptionsParams

SCHEMA_VERSION = 1
MANIFEST = "manifest.jsonl"
META = "meta.json"
IMAGES = "images"


@dataclass(frozen=True)
class CalibrationRecord:
    """One image+caption pair; ``image`` is relative to the calibration directory."""

    index: int
    image_id: int
    annotation_id: int
    caption: str
    image: str
    width: int
    height: int
    source_file_name: str


@dataclass(frozen=True)
class CalibrationMeta:
    schema_version: int
    annotations: str
    annotations_sha256: str
    images_dir: str
    count: int
    seed: int
    captions_per_image: str
    max_side: int
    mode: str


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise InputError(f"{path}: {what}")


def load_coco(path: Path) -> COCO:
    """Validate the COCO 2017 captions schema, then index it with pycocotools."""
    _require(path.is_file(), path, "annotation file not found (expected a COCO captions_*.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    _require(isinstance(data, dict), path, "expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        _require(
            isinstance(data.get(key), list),
            path,
            f"field '{key}' missing or not a list (COCO captions schema)",
        )
    for i, img in enumerate(data["images"]):
        ok = (
            isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str)
        )
        _require(
            ok, path, f"images[{i}]: expected an object with integer 'id' and string 'file_name', got {img!r}"
        )
    for i, ann in enumerate(data["annotations"]):
        ok = (
            isinstance(ann, dict)
            and isinstance(ann.get("id"), int)
            and isinstance(ann.get("image_id"), int)
            and isinstance(ann.get("caption"), str)
        )
        _require(
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
    _require(not orphans, path, f"annotations {orphans[:5]} refer to image ids missing from 'images'")
    return coco


def draw_sample(coco: COCO, count: int, seed: int, captions_per_image: str) -> list[tuple[dict, dict]]:
    """Pick ``count`` (image, annotation) pairs; the same file, seed and mode always give the same pairs."""
    rng = random.Random(seed)
    image_ids = sorted(i for i in coco.getImgIds() if coco.getAnnIds(imgIds=[i]))
    pairs: list[tuple[dict, dict]] = []
    if captions_per_image == "one":
        if count > len(image_ids):
            raise InputError(
                f"params.yaml: captions.count: expected at most {len(image_ids)} "
                f"(images with captions), got {count}"
            )
        for image_id in rng.sample(image_ids, count):
            anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
            pairs.append((coco.imgs[image_id], rng.choice(anns)))
        return pairs
    order = rng.sample(image_ids, len(image_ids))
    for image_id in order:
        anns = sorted(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])), key=lambda a: a["id"])
        pairs.extend((coco.imgs[image_id], ann) for ann in anns[: count - len(pairs)])
        if len(pairs) == count:
            return pairs
    raise InputError(
        f"params.yaml: captions.count: expected at most {len(pairs)} (captions in file), got {count}"
    )


def _open_rgb(path: Path, annotations: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise InputError(
            f"{path}: image listed in {annotations} is missing (check captions.images_dir)"
        ) from e
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: image listed in {annotations} does not open as an image ({e})") from e


def _resized(image: Image.Image, max_side: int) -> Image.Image:
    if max_side == 0 or max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_calibration(params: CaptionsParams, out_dir: Path) -> list[CalibrationRecord]:
    """Draw the sample, check every chosen image opens, and write the artifact atomically."""
    coco = load_coco(params.annotations)
    if not params.images_dir.is_dir():
        raise InputError(f"params.yaml: captions.images_dir: {params.images_dir} is not a directory")
    pairs = draw_sample(coco, params.count, params.seed, params.captions_per_image)
    records = []
    with atomic_dir(out_dir) as tmp:
        (tmp / IMAGES).mkdir()
        for index, (img, ann) in enumerate(pairs):
            image = _resized(
                _open_rgb(params.images_dir / img["file_name"], params.annotations), params.max_side
            )
            rel = f"{IMAGES}/{Path(img['file_name']).stem}.jpg"
            if not (tmp / rel).exists():
                image.save(tmp / rel, quality=95)
            records.append(
                CalibrationRecord(
                    index,
                    img["id"],
                    ann["id"],
                    ann["caption"].strip(),
                    rel,
                    image.width,
                    image.height,
                    img["file_name"],
                )
            )
        meta = CalibrationMeta(
            SCHEMA_VERSION,
            str(params.annotations),
            _sha256(params.annotations),
            str(params.images_dir),
            params.count,
            params.seed,
            params.captions_per_image,
            params.max_side,
            params.mode,
        )
        (tmp / META).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        with (tmp / MANIFEST).open("w") as f:
            for r in records:
                f.write(json.dumps(asdict(r)) + "\n")
    return records


def _typed(cls: type, raw: Any, where: str) -> Any:
    fields = cls.__dataclass_fields__
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise InputError(f"{where}: expected fields {sorted(fields)}, got {raw!r}")
    for name, f in fields.items():
        kind = {"int": int, "str": str}[f.type]
        if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
            raise InputError(f"{where}: field '{name}' expected {f.type}, got {raw[name]!r}")
    return cls(**raw)


def load_calibration(cal_dir: Path) -> tuple[CalibrationMeta, list[CalibrationRecord]]:
    """Read and validate a calibration directory written by :func:`prepare_calibration`."""
    meta_path, manifest = cal_dir / META, cal_dir / MANIFEST
    for p in (meta_path, manifest):
        _require(p.is_file(), p, "missing (run the prepare_captions stage first)")
    try:
        meta = _typed(CalibrationMeta, json.loads(meta_path.read_text()), str(meta_path))
        lines = [ln for ln in manifest.read_text().splitlines() if ln.strip()]
        records = [
            _typed(CalibrationRecord, json.loads(ln), f"{manifest}:{i + 1}") for i, ln in enumerate(lines)
        ]
    except json.JSONDecodeError as e:
        raise InputError(f"{cal_dir}: manifest or meta is not valid JSON ({e})") from e
    _require(meta.schema_version == SCHEMA_VERSION, meta_path, f"schema_version {SCHEMA_VERSION} expected")
    _require(bool(records), manifest, "no records")
    for r in records:
        _require((cal_dir / r.image).is_file(), cal_dir / r.image, f"image of record {r.index} is missing")
    return meta, records
