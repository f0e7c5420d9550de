"""The synthetic shapes demo set: one solid shape per image, its caption, and a small tokenizer.

    python shapes.py --out data/demo [--n 2400] [--seed 0]

5 colours x 4 shapes with jittered size and position, captions "a red circle"-style, exactly balanced per split
so text alone is at chance. COCO-format caption files, so the demo takes the same data path as real COCO.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from config import IMAGE_TOKEN, CommandLine
from dataset import CAPTION_INSTRUCTIONS
from processor import build_word_tokenizer

DEMO_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 180),
}
DEMO_SHAPES = ("circle", "square", "triangle", "cross")
DEMO_IMAGE_SIZE = 64
DEMO_VAL_IMAGES = 300


def demo_captions() -> list[str]:
    """Every demo caption ("a red circle", ...); each is equally likely, so chance level is 1/len(this)."""
    return [f"a {colour} {shape}" for colour in DEMO_COLOURS for shape in DEMO_SHAPES]


def _draw_shape(colour: str, shape: str, rng: np.random.Generator) -> Image.Image:
    size = DEMO_IMAGE_SIZE
    grey = int(rng.integers(225, 256))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    # Large shapes with a little size/position jitter, so the model learns the shape, not a pixel template.
    radius = int(rng.integers(17, 25))
    cx, cy = (int(rng.integers(radius + 2, size - radius - 1)) for _ in range(2))
    fill = DEMO_COLOURS[colour]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        inner = int(radius * 0.85)
        draw.rectangle((cx - inner, cy - inner, cx + inner, cy + inner), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:
        arm = max(4, radius // 3)
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    return image


def make_demo(out: str | os.PathLike, n: int = 2400, seed: int = 0) -> dict:
    """Write the shapes demo set (PNG images, COCO captions_train/val.json, tokenizer/) to ``out``.

    Captions are balanced within each split (counts differ by at most one), so text alone predicts the answer
    only at chance level 1/len(demo_captions()) = 1/20. Same seed -> byte-identical files.
    """
    out = Path(out)
    captions = demo_captions()
    if n < DEMO_VAL_IMAGES + len(captions):
        raise ValueError(f"--n must be at least {DEMO_VAL_IMAGES + len(captions)} (val has {DEMO_VAL_IMAGES})")
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {"val": DEMO_VAL_IMAGES, "train": n - DEMO_VAL_IMAGES}
    image_id = 0
    for split, count in splits.items():
        labels = [captions[i % len(captions)] for i in range(count)]
        labels = [labels[i] for i in rng.permutation(count)]
        images, annotations = [], []
        for label in labels:
            image_id += 1
            _, colour, shape = label.split()
            file_name = f"{image_id:06d}.png"
            _draw_shape(colour, shape, rng).save(out / "images" / file_name, optimize=False)
            images.append({"id": image_id, "file_name": file_name, "width": DEMO_IMAGE_SIZE, "height": DEMO_IMAGE_SIZE})
            annotations.append({"id": image_id, "image_id": image_id, "caption": label})
        info = {"description": f"PhiClipMLLM shapes demo, seed {seed}", "version": "1"}
        coco = {"info": info, "licenses": [], "images": images, "annotations": annotations}
        (out / f"captions_{split}.json").write_text(json.dumps(coco, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    chat = [f"<|user|>\n{q} {IMAGE_TOKEN}<|end|>\n<|assistant|>\n" for q in CAPTION_INSTRUCTIONS]
    texts = chat + [f"{c}<|end|>\n<|endoftext|>" for c in captions] * 5
    build_word_tokenizer(texts).save_pretrained(out / "tokenizer")
    return {**splits, "distinct_captions": len(captions), "chance_level": 1 / len(captions)}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python shapes.py --out DIR [--n N] [--seed S]``."""
    parser = CommandLine(description="Write the synthetic shapes demo set (images, captions, tokenizer).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=2400, help="total images (val gets 300, train the rest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = make_demo(args.out, n=args.n, seed=args.seed)
    distinct = summary["distinct_captions"]
    print(
        f"wrote {summary['train']} train + {summary['val']} val images to {args.out}; {distinct} distinct balanced "
        f"captions, chance level 1/{distinct} = {summary['chance_level']:.3f}"
    )


if __name__ == "__main__":
    main()
