"""Generate the embedded COCO-format captions sample shipped in ``data/coco-sample/``.

Why: the pipeline must run offline, so the repo carries a tiny data set in the exact
COCO 2017 captions schema. Each image is a drawn scene (shapes, colours, counts) and its
captions describe what is drawn, so a caption really belongs to its image. Rerun this
script only to regenerate the sample; the pipeline never calls it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
ROOT = Path(__file__).resolve().parents[1] / "data" / "coco-sample"
SPLIT = "sample2017"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def _scene(rng: random.Random, width: int, height: int):
    background = rng.choice(list(COLOURS))
    colour = rng.choice([c for c in COLOURS if c != background])
    shape = rng.choice(SHAPES)
    count = rng.choice((1, 2, 3))
    image = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(image)
    side = min(width // (count + 1), height // 2)
    for i in range(count):
        x0 = (i + 1) * width // (count + 1) - side // 2
        y0 = height // 2 - side // 2 + rng.randint(-side // 4, side // 4)
        _draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
    noun = shape if count == 1 else shape + "s"
    article = ("an" if colour[0] in "aeiou" else "a") if count == 1 else NUMBER_WORDS[count]
    bg_article = "An" if background[0] in "aeiou" else "A"
    captions = [
        f"{article.capitalize()} {colour} {noun} on a {background} background.",
        f"{bg_article} {background} picture showing {NUMBER_WORDS[count]} {colour} {noun}.",
        f"{NUMBER_WORDS[count].capitalize()} {colour} {noun} drawn in a row over {background}.",
    ]
    if count > 1:
        captions.append(f"Several {colour} {noun} of the same size side by side.")
    return image, captions


def main(n_images: int = 20, seed: int = 2017) -> None:
    rng = random.Random(seed)
    (ROOT / SPLIT).mkdir(parents=True, exist_ok=True)
    (ROOT / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        width, height = rng.choice([(96, 72), (112, 84), (128, 96), (80, 80), (72, 96)])
        image, captions = _scene(rng, width, height)
        file_name = f"{image_id:012d}.jpg"
        image.save(ROOT / SPLIT / file_name, quality=90)
        images.append(
            {
                "license": 1,
                "file_name": file_name,
                "coco_url": "",
                "height": height,
                "width": width,
                "date_captured": "2026-11-22 00:00:00",
                "flickr_url": "",
                "id": image_id,
            }
        )
        for caption in captions:
            annotations.append({"image_id": image_id, "id": len(annotations) + 1, "caption": caption})
    doc = {
        "info": {
            "description": "op-sensitivity embedded COCO-format captions sample (generated shapes)",
            "url": "",
            "version": "1.0",
            "year": 2026,
            "contributor": "op-sensitivity",
            "date_created": "2026/11/22",
        },
        "licenses": [{"url": "", "id": 1, "name": "CC0 1.0 (generated images)"}],
        "images": images,
        "annotations": annotations,
    }
    path = ROOT / "annotations" / f"captions_{SPLIT}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(images)} images and {len(annotations)} captions to {ROOT}")


if __name__ == "__main__":
    main()
