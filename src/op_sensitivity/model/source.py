"""Stage load_model: materialize a loadable HF directory (model + processor) from a source.

Sources, each reading one path, ``model.input`` (the stage's one data dep in ``dvc.yaml``):
``tiny`` (embedded default: tokenizer trained on the captions of the calibration sample at
``input``, seeded random weights), ``full_size_random`` (the published Qwen2.5-VL-3B
architecture, same tokenizer, seeded random weights: for speed/memory measurements) or
``hf_dir`` (``input`` is a local Qwen2.5-VL snapshot, e.g. Qwen2.5-VL-3B-Instruct).
The random sources write their generated weights into the output directory. A snapshot is
never copied: the output holds only what the stage derives (processor and tokenizer with the
params' pixel bounds, chat template) and the card, which names the snapshot and its content
hash; later stages load the weights from the snapshot and refuse one whose hash changed
(:func:`load_model_dir`). Weights load in their stored dtype (a published bf16 checkpoint stays
bf16 in memory; the engines cast what they compute with).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..atomic import atomic_dir
from ..data.calibration import check_sample_input, load_calibration
from ..errors import InputError
from ..params import ModelParams
from .processor import CHAT_TEMPLATE, ImageTextProcessor
from .tiny import build_tiny_model
from .tokenizer import train_tokenizer

CARD = "op_sensitivity_model.json"
SUPPORTED_MODEL_TYPE = "qwen2_5_vl"
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


@dataclass(frozen=True)
class ModelCard:
    """What later stages and reports need to know about the materialized model.

    ``sha256``: the content hash of the weights' directory: the output directory for the random
    sources, the snapshot (``origin``) for ``hf_dir``.
    """

    source: str
    origin: str
    random_weights: bool
    seed: int | None
    sha256: str
    params: int
    model_type: str


def dir_sha256(path: Path, exclude: tuple[str, ...] = (CARD,)) -> str:
    """Content hash of a model directory (relative names + bytes), independent of mtimes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in exclude):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_weights(path: Path, fix: str = "re-copy the snapshot") -> None:
    """Open every safetensors header: a truncated or foreign file is named here, not deep in transformers."""
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            raise InputError(f"{f}: not a readable safetensors file ({e}); {fix}") from e


def check_hf_dir(path: Path, where: str = "model.input") -> None:
    """Fail early, naming the directory or file, when it is not a Qwen2.5-VL snapshot with weights."""
    if not path.is_dir():
        raise InputError(
            f"{where}: {path} is not a directory (expected a Qwen2.5-VL snapshot with source hf_dir)"
        )
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"{config}: missing (expected a Hugging Face model snapshot)")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InputError(f"{config}: not a JSON object ({e})") from e
    if model_type != SUPPORTED_MODEL_TYPE:
        raise InputError(
            f"{config}: model_type {model_type!r}, expected {SUPPORTED_MODEL_TYPE!r} (Qwen2.5-VL)"
        )
    if not any(any(path.glob(g)) for g in WEIGHT_GLOBS):
        raise InputError(f"{path}: no weights (expected {' or '.join(WEIGHT_GLOBS)})")
    _check_weights(path)


def _processor_bounds(params: ModelParams) -> dict[str, int]:
    return {
        k: v
        for k, v in (("min_pixels", params.min_pixels), ("max_pixels", params.max_pixels))
        if v is not None
    }


def _from_random(params: ModelParams) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageTextProcessor]:
    """Tokenizer trained on the captions + seeded random weights: tiny sizes, or the full 3B architecture."""
    check_sample_input(params.input, params.where("input"), params.source)
    _, records = load_calibration(params.input)
    tokenizer = train_tokenizer((r.caption for r in records), params.tiny.vocab_size)
    image_processor = Qwen2VLImageProcessorPil(**_processor_bounds(params))
    processor = ImageTextProcessor(tokenizer, image_processor, CHAT_TEMPLATE)
    processor.check_bounds(params.where("processor"))
    if params.source == "full_size_random":
        from .full_size import build_full_size_model

        return build_full_size_model(tokenizer, params.seed, params.full_size), processor
    return build_tiny_model(params.tiny, tokenizer, params.seed), processor


def _from_hf_dir(params: ModelParams) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageTextProcessor]:
    check_hf_dir(params.input, params.where("input"))
    processor = ImageTextProcessor.load(params.input, params.min_pixels, params.max_pixels)
    processor.check_bounds(params.where("processor"))
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            params.input, dtype="auto", local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise InputError(f"{params.input}: weights do not load as Qwen2.5-VL ({e})") from e
    return model.eval(), processor


def materialize_model(
    params: ModelParams, out_dir: Path
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageTextProcessor, ModelCard]:
    """Write the model directory atomically and return the in-memory model, its processor and card."""
    snapshot = params.source == "hf_dir"
    if snapshot:
        model, processor = _from_hf_dir(params)
        origin, seed = str(params.input), None
    else:
        model, processor = _from_random(params)
        origin = (
            f"full-size Qwen2.5-VL-{params.full_size.upper()}-Instruct architecture (seeded random weights)"
            if params.source == "full_size_random"
            else "embedded tiny Qwen2.5-VL (seeded random weights)"
        )
        seed = params.seed
    with atomic_dir(out_dir) as tmp:
        if not snapshot:
            model.save_pretrained(tmp)
        processor.save(tmp)
        card = ModelCard(
            params.source,
            origin,
            not snapshot,
            seed,
            dir_sha256(params.input if snapshot else tmp),
            sum(p.numel() for p in model.parameters()),
            model.config.model_type,
        )
        (tmp / CARD).write_text(json.dumps(asdict(card), indent=2) + "\n")
    return model, processor, card


_CARD_TYPES: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "origin": (str,),
    "random_weights": (bool,),
    "seed": (int, type(None)),
    "sha256": (str,),
    "params": (int,),
    "model_type": (str,),
}


def read_card(model_dir: Path) -> ModelCard:
    """Read the card back, checked field by field: a damaged card is named with the key that is off."""
    path = model_dir / CARD
    if not path.is_file():
        raise InputError(f"{path}: missing (run the load_model stage first)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); rerun the load_model stage") from e
    rerun = "rerun the load_model stage"
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object (a model card), got {type(raw).__name__}; {rerun}")
    unknown = sorted(set(raw) - set(_CARD_TYPES))
    if unknown:
        raise InputError(
            f"{path}: unknown key {unknown[0]!r} (a model card has {', '.join(_CARD_TYPES)}); {rerun}"
        )
    for key, kinds in _CARD_TYPES.items():
        if key not in raw:
            raise InputError(f"{path}: key {key!r} missing; {rerun}")
        value = raw[key]
        ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
        if not ok:
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise InputError(f"{path}: {key}: expected {expected}, got {value!r}; {rerun}")
    if not re.fullmatch(r"[0-9a-f]{64}", raw["sha256"]):
        raise InputError(f"{path}: sha256: expected 64 hex digits, got {raw['sha256']!r}; {rerun}")
    if raw["params"] < 0:
        raise InputError(f"{path}: params: expected an integer >= 0, got {raw['params']}; {rerun}")
    return ModelCard(**raw)


def weights_dir(model_dir: Path, card: ModelCard) -> Path:
    """Where the card's weights are: the snapshot it names (checked against its hash) or the dir itself.

    A random source's output has its safetensors headers opened (:func:`_check_weights`): a damaged
    file is named here, before any loader meets it.
    """
    if card.source != "hf_dir":
        _check_model_dir(model_dir)
        return model_dir
    snapshot = Path(card.origin)
    if not snapshot.is_dir():
        raise InputError(
            f"{snapshot}: the snapshot {model_dir / CARD} names is gone (rerun the load_model stage)"
        )
    if dir_sha256(snapshot) != card.sha256:
        raise InputError(
            f"{snapshot}: the snapshot changed since load_model hashed it ({card.sha256[:12]}); "
            "rerun the load_model stage"
        )
    return snapshot  # the bytes load_model checked (check_hf_dir), by their hash


def _check_model_dir(model_dir: Path) -> None:
    """What a random source's output must hold: its config and weights, every header readable."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise InputError(f"{config}: missing (rerun the load_model stage)")
    if not any(any(model_dir.glob(g)) for g in WEIGHT_GLOBS):
        raise InputError(
            f"{model_dir}: no weights (expected {' or '.join(WEIGHT_GLOBS)}; rerun the load_model stage)"
        )
    _check_weights(model_dir, "rerun the load_model stage")


def load_config(model_dir: Path) -> Qwen2_5_VLConfig:
    """The config of a model directory, wherever its weights are: through the card of
    ``load_model``'s output (a snapshot's own config for ``hf_dir``: that output holds none), else
    the directory's own ``config.json`` (a checkpoint a quantize target wrote)."""
    source = weights_dir(model_dir, read_card(model_dir)) if (model_dir / CARD).is_file() else model_dir
    if not (source / "config.json").is_file():  # transformers 5.24 would return a default config
        raise InputError(f"{source / 'config.json'}: not found (a model or artifact directory holds one)")
    try:
        return Qwen2_5_VLConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"{source / 'config.json'}: not a Qwen2.5-VL config ({e})") from e


def load_model_dir(
    model_dir: Path,
) -> tuple[Qwen2_5_VLForConditionalGeneration, ImageTextProcessor, ModelCard]:
    """Load what :func:`materialize_model` described: weights in their stored dtype, eval mode."""
    card = read_card(model_dir)
    source = weights_dir(model_dir, card)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, dtype="auto", local_files_only=True
        ).eval()
    except (OSError, ValueError, SafetensorError) as e:
        raise InputError(
            f"{source}: weights do not load as Qwen2.5-VL ({e}); rerun the load_model stage"
        ) from e
    return model, ImageTextProcessor.load(model_dir), card
