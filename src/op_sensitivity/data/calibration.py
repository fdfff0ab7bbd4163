"""The sample directories of stage ``prepare_captions``: write them, read them back validated.

Three directories of one format, disjoint by image, each drawn from ``captions.seed``:

* ``data/calibration`` (``captions.count`` pairs): observers are calibrated on it and the
  sensitivity pass measures on it (and the curve's single-op damage that orders ``measured``);
* ``data/selection`` (``captions.selection_count``): the ``curve`` stage measures every ranking's
  top-n lists on it, and the measured keep-list policies choose the list from those numbers;
* ``data/test`` (``captions.test_count``): only ``validate`` measures on it, so the list is proven
  on images neither the calibration nor the choice used::

    <out>/meta.json        CalibrationMeta: where the sample came from, how it was drawn, which split
    <out>/manifest.jsonl   one CalibrationRecord per line, in sample order
    <out>/images/<file>    the chosen images (RGB JPEG; resized copies when max_side > 0)

Why a copy of the images: the sensitivity stage then depends only on this directory, so
DVC can cache and share the exact calibration inputs without the 18 GB COCO train set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..atomic import atomic_dir
from ..errors import InputError, require
from ..params import CaptionsParams
from .coco import draw_held_out, draw_sample, load_coco

SCHEMA_VERSION = 2
SPLITS = ("calibration", "selection", "test")
MANIFEST = "manifest.jsonl"
META = "meta.json"
IMAGES = "images"
CALIBRATION_OUT = Path("data/calibration")  # where stage prepare_captions writes the sample (dvc.yaml)


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
    split: str  # calibration | selection | test
    annotations: str
    annotations_sha256: str
    images_dir: str
    count: int
    seed: int
    captions_per_image: str
    max_side: int
    mode: str


@contextlib.contextmanager
def _listed_image(path: Path, annotations: Path) -> Iterator[Image.Image]:
    """The image a caption lists, opened (header only until read); a missing or broken one is one
    line naming it and the annotations file."""
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError as e:
        raise InputError(
            f"{path}: image listed in {annotations} is missing (check captions.images_dir)"
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: image listed in {annotations} does not open as an image ({e})") from e


def _open_rgb(path: Path, annotations: Path) -> Image.Image:
    with _listed_image(path, annotations) as im:
        return im.convert("RGB")


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


def _write_split(
    tmp: Path, pairs: list[tuple[dict, dict]], params: CaptionsParams, split: str, sha256: str
) -> list[CalibrationRecord]:
    (tmp / IMAGES).mkdir()
    records = []
    for index, (img, ann) in enumerate(pairs):
        image = _resized(_open_rgb(params.images_dir / img["file_name"], params.annotations), params.max_side)
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
        split,
        str(params.annotations),
        sha256,
        str(params.images_dir),
        len(pairs),
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


def check_sample_input(path: Path, where: str, source: str, written_by_dag: bool = False) -> None:
    """``model.input`` of a random source (tiny, full_size_random) must be a calibration sample:
    their tokenizer is trained on its captions. ``written_by_dag``: also accept the directory
    ``prepare_captions`` writes (``check_params`` runs before it, on a fresh clone)."""
    if (path / META).is_file():
        return
    if written_by_dag and path.resolve() == CALIBRATION_OUT.resolve():
        return
    raise InputError(
        f"{where}: {path} is not a calibration sample (with source {source} the input is the "
        f"prepare_captions output, e.g. {CALIBRATION_OUT})"
    )


def draw_splits(params: CaptionsParams) -> dict[str, list[tuple[dict, dict]]]:
    """The three splits' (image, annotation) pairs, in :data:`SPLITS` order; same file and params,
    same pairs. The calibration sample is drawn first (as when it was the only split), then the
    selection split from the images it leaves, then the test split from the images both leave."""
    coco = load_coco(params.annotations)
    if not params.images_dir.is_dir():
        raise InputError(f"{params.where('images_dir')}: {params.images_dir} is not a directory")
    mode = params.captions_per_image
    calibration = draw_sample(coco, params.count, params.seed, mode, params.where("count"))
    selection = draw_held_out(
        coco,
        calibration,
        params.selection_count,
        params.seed,
        "selection",
        mode,
        params.where("selection_count"),
        "the calibration sample (captions.count)",
    )
    test = draw_held_out(
        coco,
        calibration + selection,
        params.test_count,
        params.seed,
        "test",
        mode,
        params.where("test_count"),
        "the calibration sample and the selection split (captions.count + selection_count)",
    )
    splits = {"calibration": calibration, "selection": selection, "test": test}
    for pairs in splits.values():
        for img, _ in pairs:
            _check_listed_image(params.images_dir / img["file_name"], params.annotations)
    return splits


def _check_listed_image(path: Path, annotations: Path) -> None:
    """A drawn image is there and is an image (its header: cheap, no decoding), so ``check_params``
    (which draws the same splits) names a missing one before DVC deletes prepare_captions' outputs."""
    with _listed_image(path, annotations):
        pass


def prepare_calibration(
    params: CaptionsParams, out_dir: Path, selection_dir: Path | None = None, test_dir: Path | None = None
) -> list[CalibrationRecord]:
    """Draw the three splits, check every chosen image opens, write the calibration sample to
    ``out_dir`` and the held-out splits to ``selection_dir`` / ``test_dir`` (each where given).

    The directories land together or not at all. Returns the calibration records.
    """
    pairs = draw_splits(params)
    sha256 = _sha256(params.annotations)
    with contextlib.ExitStack() as stack:
        for split, where in (("selection", selection_dir), ("test", test_dir)):
            if where is not None:
                _write_split(stack.enter_context(atomic_dir(where)), pairs[split], params, split, sha256)
        return _write_split(
            stack.enter_context(atomic_dir(out_dir)), pairs["calibration"], params, "calibration", sha256
        )


def _typed(cls: type, raw: Any, where: str) -> Any:
    fields = cls.__dataclass_fields__
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise InputError(f"{where}: expected fields {sorted(fields)}, got {raw!r}")
    for name, f in fields.items():
        kind = {"int": int, "str": str}[f.type]
        if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
            raise InputError(f"{where}: field '{name}' expected {f.type}, got {raw[name]!r}")
    return cls(**raw)


def load_calibration(
    cal_dir: Path, split: str = "calibration"
) -> tuple[CalibrationMeta, list[CalibrationRecord]]:
    """Read and validate a directory written by :func:`prepare_calibration`; it must hold ``split``.

    In mode ``image_caption`` every image is decoded whole and its size checked against the
    manifest, so a damaged one is named here, before any model loads.
    """
    meta_path, manifest = cal_dir / META, cal_dir / MANIFEST
    for p in (meta_path, manifest):
        require(p.is_file(), p, "missing (run the prepare_captions stage first)")
    try:
        raw = json.loads(meta_path.read_text())
        version = raw.get("schema_version") if isinstance(raw, dict) else None
        require(
            version == SCHEMA_VERSION,
            meta_path,
            f"schema_version {SCHEMA_VERSION} expected, got {version!r} (rerun the prepare_captions stage)",
        )
        meta = _typed(CalibrationMeta, raw, str(meta_path))
        lines = [ln for ln in manifest.read_text().splitlines() if ln.strip()]
        records = [
            _typed(CalibrationRecord, json.loads(ln), f"{manifest}:{i + 1}") for i, ln in enumerate(lines)
        ]
    except json.JSONDecodeError as e:
        raise InputError(f"{cal_dir}: manifest or meta is not valid JSON ({e})") from e
    require(meta.split == split, meta_path, f"the {split} split expected, got the {meta.split} split")
    require(bool(records), manifest, "no records")
    for r in records:
        require((cal_dir / r.image).is_file(), cal_dir / r.image, f"image of record {r.index} is missing")
        if meta.mode == "image_caption":
            _check_image(cal_dir / r.image, r)
    return meta, records


def _check_image(path: Path, record: CalibrationRecord) -> None:
    """Decode the image whole (an emptied or truncated file is named here, not deep in a batch)."""
    rerun = "rerun the prepare_captions stage"
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: image of record {record.index} does not decode ({e}); {rerun}") from e
    require(
        size == (record.width, record.height),
        path,
        f"image of record {record.index} is {size[0]}x{size[1]}, the manifest says "
        f"{record.width}x{record.height}; {rerun}",
    )
