"""The embedded default's architecture, briefly trained on the sample captions: a model that is not random.

    python benchmarks/trained_tiny.py            # build (or reuse) the cached model dir, print its figures

Start: the tiny model as tests/conftest.py's ``default_model_dir`` builds it (``materialize_model``,
the embedded default's sizes, tokenizer trained on the calibration sample's captions). Data: every
caption of data/coco-sample (20 images), written by ``prepare_calibration`` as the pipeline writes
its splits (``captions_per_image: all``, split at image boundaries so no caption is left out) and
encoded by ``build_eval_batches`` (the chat prompt with the image, as the pipeline feeds it, and the
mask of the caption's own tokens). Loss: next-token cross entropy on the caption tokens. AdamW,
seeded, a fixed order (a seeded permutation per epoch), ``STEPS`` steps on 1 torch thread (the
weights must not depend on the caller's thread count). The result is a model dir as the fixture's
(``save_pretrained``, the card re-hashed, the inventory beside it), cached under the system temp
dir by the base model's hash, the training settings and the code that builds the batches, so a
rerun reuses it; ``training.json`` beside it holds the loss before and after, chance (ln of the
vocabulary size) and the curve.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from op_sensitivity.atomic import atomic_dir  # noqa: E402
from op_sensitivity.data.calibration import SPLITS, load_calibration, prepare_calibration  # noqa: E402
from op_sensitivity.data.coco import draw_held_out, draw_sample, load_coco  # noqa: E402
from op_sensitivity.model.batches import build_eval_batches  # noqa: E402
from op_sensitivity.model.source import CARD, dir_sha256, load_model_dir, read_card  # noqa: E402
from tests.helpers import SAMPLE_ANNOTATIONS, SAMPLE_IMAGES  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "op_sensitivity_trained_tiny"
SETTINGS = {"steps": 300, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.01, "seed": 0}
SPLIT_IMAGES = (8, 6)  # images of the calibration and selection splits; the test split takes the rest
TRAINING = "training.json"
# What the training reads besides the data: a change here (e.g. the batches gaining the 3-D rotary
# positions' token types) must not reuse a model trained the old way.
CODE = (
    Path(__file__),
    REPO / "src/op_sensitivity/model/batches.py",
    REPO / "src/op_sensitivity/model/processor.py",
    REPO / "src/op_sensitivity/data/calibration.py",
    REPO / "src/op_sensitivity/data/coco.py",
)


# -- the data ------------------------------------------------------------------------------------


def _pairs_of_first(pairs: list[tuple[dict, dict]], images: int) -> int:
    """How many of ``pairs`` (grouped by image, in draw order) belong to the first ``images`` images."""
    seen: list[int] = []
    for n, (img, _) in enumerate(pairs):
        if img["id"] not in seen:
            if len(seen) == images:
                return n
            seen.append(img["id"])
    return len(pairs)


def caption_splits(repo_params, work: Path) -> list[Path]:
    """Every caption of the sample in the three split dirs ``prepare_calibration`` writes (one
    caption per pair, ``captions_per_image: all``), the counts cut at image boundaries."""
    coco = load_coco(SAMPLE_ANNOTATIONS)
    seed, total = repo_params.captions.seed, len(coco.anns)
    everything = draw_sample(coco, total, seed, "all")
    count = _pairs_of_first(everything, SPLIT_IMAGES[0])
    rest = draw_held_out(coco, everything[:count], total - count, seed, "selection", "all", "", "")
    selection = _pairs_of_first(rest, SPLIT_IMAGES[1])
    captions = replace(
        repo_params.captions,
        annotations=SAMPLE_ANNOTATIONS,
        images_dir=SAMPLE_IMAGES,
        captions_per_image="all",
        count=count,
        selection_count=selection,
        test_count=total - count - selection,
    )
    dirs = [work / split for split in SPLITS]
    prepare_calibration(captions, *dirs)
    return dirs


def training_batches(dirs: list[Path], processor, batch_size: int) -> list[tuple[dict, torch.Tensor]]:
    """Each split's records, encoded as validation encodes them: a batch and its caption mask."""
    out = []
    for split, where in zip(SPLITS, dirs, strict=True):
        meta, records = load_calibration(where, split)
        out += build_eval_batches(records, where, processor, meta.mode, batch_size)
    return out


# -- the training --------------------------------------------------------------------------------


def caption_loss(model, batch: dict, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross entropy on the caption tokens (position t predicted from t - 1)."""
    logits = model(**batch).logits[:, :-1]
    keep = mask[:, 1:]
    target = batch["input_ids"][:, 1:]
    return F.cross_entropy(logits[keep].float(), target[keep]), int(keep.sum())


def data_loss(model, batches: list[tuple[dict, torch.Tensor]]) -> float:
    """The caption tokens' mean loss over all batches (token-weighted), no dropout."""
    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for batch, mask in batches:
            loss, n = caption_loss(model, batch, mask)
            total, tokens = total + float(loss) * n, tokens + n
    return total / tokens


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(model, batches: list[tuple[dict, torch.Tensor]], settings: dict[str, Any]) -> dict[str, Any]:
    """AdamW for ``steps`` steps, one batch a step, a seeded permutation of the batches per epoch."""
    torch.manual_seed(settings["seed"])
    order = torch.Generator().manual_seed(settings["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    start, before = time.perf_counter(), data_loss(model, batches)
    curve: list[float] = []
    queue: list[int] = []
    model.train()
    for _ in range(settings["steps"]):
        if not queue:
            queue = torch.randperm(len(batches), generator=order).tolist()
        batch, mask = batches[queue.pop(0)]
        loss, _ = caption_loss(model, batch, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(round(loss.item(), 4))
    after = data_loss(model, batches)
    return {
        "loss_before": round(before, 4),
        "loss_after": round(after, 4),
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }


# -- the model dir -------------------------------------------------------------------------------


def trained_model(repo_params, base: Path, settings: dict[str, Any] = SETTINGS) -> Path:
    """The model dir (inventory beside it) of ``base`` trained as above: cached, built on a miss."""
    card = read_card(base)
    data = {"annotations": dir_sha256(SAMPLE_ANNOTATIONS.parent), "split_images": SPLIT_IMAGES}
    data["code"] = hashlib.sha256(b"".join(f.read_bytes() for f in CODE)).hexdigest()
    key = json.dumps({"base": card.sha256, **data, **settings})
    home = CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (home / TRAINING).is_file():
        return home / base.name
    with atomic_dir(home) as tmp, one_thread():
        out = tmp / base.name
        shutil.copytree(base, out)
        shutil.copy(base.parent / "op_inventory.json", tmp / "op_inventory.json")
        model, processor, _ = load_model_dir(out)
        batches = training_batches(
            caption_splits(repo_params, tmp / "captions"), processor, settings["batch_size"]
        )
        vocab = model.get_output_embeddings().out_features  # the logits' width: chance is ln of it
        figures = train(model, batches, settings)
        model.eval().save_pretrained(out)
        (out / CARD).write_text(json.dumps(asdict(replace(card, sha256=dir_sha256(out)))))
        shutil.rmtree(tmp / "captions")
        tokens = sum(int(m[:, 1:].sum()) for _, m in batches)
        facts = {
            "base_sha256": card.sha256,
            "settings": settings,
            "captions": sum(len(b["input_ids"]) for b, _ in batches),
            "batches": len(batches),
            "caption_tokens": tokens,
            "vocab_size": vocab,
            "chance": round(math.log(vocab), 4),
            "torch_threads": 1,
            "torch": torch.__version__,
            **figures,
        }
        (tmp / TRAINING).write_text(json.dumps(facts, indent=2) + "\n")
    return home / base.name


def training_facts(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir.parent / TRAINING).read_text())


def main() -> None:
    from first_order_agreement import build_model, calibration  # this directory is on sys.path as a script

    from op_sensitivity.params import load_params

    repo_params = load_params(REPO / "params.yaml")
    with tempfile.TemporaryDirectory(prefix="trained_tiny_") as tmp:
        work = Path(tmp)
        cal = calibration(repo_params, work, 2)
        out = trained_model(repo_params, build_model("default", repo_params, cal, work))
    facts = training_facts(out)
    print(out)
    print(json.dumps({k: v for k, v in facts.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
