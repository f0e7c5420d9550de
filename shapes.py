"""The synthetic shapes demo set: one solid shape per image, its caption, conversations about it, and a tokenizer.

    python shapes.py --out data/demo [--n 2400] [--conversations 1600] [--seed 0]

5 colours x 4 shapes, on the left or the right, with jittered size and position; captions "a red circle on the
left", exactly balanced per split so text alone is at chance (1/40), in COCO format (the path real COCO takes).
Then LLaVA-format conversations about the same images, as LLaVA-Instruct's are about COCO's: multi-turn questions
about colour, shape and side (`<image>` at the start or the end of the first question), and in training some
text-only turns and conversations. Same seed -> byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from config import CommandLine


def command_line() -> argparse.ArgumentParser:
    """shapes.py's arguments (see the module docstring)."""
    parser = CommandLine(description="Write the synthetic shapes demo set (images, captions, tokenizer).")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, default=2400, help="total images (val gets 300, train the rest)")
    parser.add_argument("--conversations", type=int, default=1600, help="conversations about them (val gets 200)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    command_line().parse_args(sys.argv[1:])  # --help and bad arguments answer here, before numpy and torch load

import hashlib  # the heavy imports follow the early argument check above
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from config import IMAGE_TOKEN
from dataset import CAPTION_INSTRUCTIONS
from processor import build_word_tokenizer

# Far apart in RGB: the random tiny CLIP sees colour roughly linearly, and a mixed one (purple was tried) is read as
# red or blue in some seeds' runs.
DEMO_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "black": (25, 25, 25),
}
DEMO_SHAPES = ("circle", "square", "triangle", "cross")
DEMO_SIDES = ("left", "right")
DEMO_IMAGE_SIZE = 64
DEMO_VAL_IMAGES = 300
DEMO_VAL_CONVERSATIONS = 200
DEMO_STAMP = "made_by.txt"  # what made a demo set (demo_stamp), written last: a set without it is incomplete
# question kind -> (phrasings, the answers it can have), in the caption's words. The side is always asked first,
# next to the image: the tiny 2-layer LM reads where a shape is by how far back the image is (as it does in captions),
# while colour and shape it reads from the image's content at any distance.
DEMO_QUESTIONS = {
    "colour": (("What colour is it?", "Which colour is the shape?"), tuple(DEMO_COLOURS)),
    "shape": (("What shape is it?", "Which shape is this?"), tuple(f"a {shape}" for shape in DEMO_SHAPES)),
    "side": (("Where is the shape?", "Which side is it on?"), tuple(f"on the {side}" for side in DEMO_SIDES)),
}
# Turns answered from words alone, as LLaVA-Instruct mixes text-only data in (training only).
DEMO_TEXT_TURNS = (
    ("How many corners does a triangle have?", "three"),
    ("How many corners does a square have?", "four"),
    ("Which colour do blue and yellow make?", "green"),
    ("Say hello.", "hello"),
)


def demo_captions() -> list[str]:
    """Every demo caption ("a red circle on the left", ...); each equally likely: chance level is 1/len(this)."""
    return [
        f"a {colour} {shape} on the {side}" for colour in DEMO_COLOURS for shape in DEMO_SHAPES for side in DEMO_SIDES
    ]


def demo_chance(question: str) -> float:
    """The chance of answering a demo question right without looking: 1 / the answers it can have."""
    return 1 / len(DEMO_QUESTIONS[question_kind(question)][1])


def question_kind(question: str) -> str:
    """Which fact a demo question asks for: colour, shape or side."""
    for kind, (phrasings, _) in DEMO_QUESTIONS.items():
        if any(phrasing in question for phrasing in phrasings):
            return kind
    raise ValueError(f"not a demo question: {question!r}")


def _draw_shape(colour: str, shape: str, side: str, rng: np.random.Generator) -> Image.Image:
    size = DEMO_IMAGE_SIZE
    grey = int(rng.integers(225, 256))
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    # Large shapes with a little size/position jitter, so the model learns the shape, not a pixel template, but
    # little enough that a 14-pixel patch of the tiny CLIP sees much the same part of a shape each time (with
    # more, circle and square blur at 56 px); the centre sits clearly in its half (x 17-20 or 43-46 of 64).
    radius = int(rng.integers(14, 18))
    cx = int(rng.integers(17, 21)) if side == "left" else int(rng.integers(43, 47))
    cy = int(rng.integers(26, 38))
    fill = DEMO_COLOURS[colour]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":  # as wide as the circle: at 56 px a smaller one is hard to tell from it
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill)
    else:
        arm = max(4, radius // 3)
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    return image


def make_demo(out: str | os.PathLike, n: int = 2400, seed: int = 0, conversations: int = 1600) -> dict:
    """Write the shapes demo set to ``out``: PNG images, COCO captions_train/val.json, LLaVA-format
    conversations_train/val.json about those images, and tokenizer/.

    Captions are balanced within each split (counts differ by at most one), so text alone predicts them only at
    chance level 1/len(demo_captions()) = 1/40. Same seed -> byte-identical files.
    """
    out = Path(out)
    captions = demo_captions()
    if n < DEMO_VAL_IMAGES + len(captions):
        raise ValueError(f"--n must be at least {DEMO_VAL_IMAGES + len(captions)} (val has {DEMO_VAL_IMAGES})")
    talks = {"val": DEMO_VAL_CONVERSATIONS, "train": conversations - DEMO_VAL_CONVERSATIONS}
    splits = {"val": DEMO_VAL_IMAGES, "train": n - DEMO_VAL_IMAGES}
    if talks["train"] <= 0 or talks["train"] > splits["train"]:
        raise ValueError(
            f"--conversations must be between {DEMO_VAL_CONVERSATIONS + 1} and {DEMO_VAL_CONVERSATIONS + splits['train']} "
            f"(val has {DEMO_VAL_CONVERSATIONS}; train at most one per training image)"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / DEMO_STAMP).unlink(missing_ok=True)  # a set rewritten only in part is no set
    rng = np.random.default_rng(seed)
    image_id = 0
    for split, count in splits.items():
        labels = [captions[i % len(captions)] for i in range(count)]
        labels = [labels[i] for i in rng.permutation(count)]
        images, annotations = [], []
        for label in labels:
            image_id += 1
            _, colour, shape, _, _, side = label.split()
            file_name = f"{image_id:06d}.png"
            _draw_shape(colour, shape, side, rng).save(out / "images" / file_name, optimize=False)
            images.append({"id": image_id, "file_name": file_name, "width": DEMO_IMAGE_SIZE, "height": DEMO_IMAGE_SIZE})
            annotations.append({"id": image_id, "image_id": image_id, "caption": label})
        info = {"description": f"PhiClipMLLM shapes demo, seed {seed}", "version": "1"}
        coco = {"info": info, "licenses": [], "images": images, "annotations": annotations}
        (out / f"captions_{split}.json").write_text(json.dumps(coco, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        entries = _conversations(images[: talks[split]], labels, split == "train", rng)
        (out / f"conversations_{split}.json").write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    chat = [f"<|user|>\n{q} {IMAGE_TOKEN}<|end|>\n<|assistant|>\n" for q in CAPTION_INSTRUCTIONS]
    questions = [q for phrasings, _ in DEMO_QUESTIONS.values() for q in phrasings] + [q for q, _ in DEMO_TEXT_TURNS]
    answers = [a for _, choices in DEMO_QUESTIONS.values() for a in choices] + [a for _, a in DEMO_TEXT_TURNS]
    texts = chat + [f"{c}<|end|>\n<|endoftext|>" for c in captions] * 5
    texts += [f"<|user|>\n{q}<|end|>\n<|assistant|>\n" for q in questions] + [f"{a}<|end|>\n" for a in answers] * 5
    build_word_tokenizer(texts).save_pretrained(out / "tokenizer")
    (out / DEMO_STAMP).write_text(demo_stamp(n, seed, conversations), encoding="utf-8")  # last: the set is whole
    return {
        **splits,
        **{f"conversations_{split}": count for split, count in talks.items()},
        "distinct_captions": len(captions),
        "chance_level": 1 / len(captions),
    }


def demo_stamp(n: int = 2400, seed: int = 0, conversations: int = 1600) -> str:
    """What a demo set's files follow from: this file's code and make_demo's arguments. make_demo writes it into
    the set last (DEMO_STAMP); a set made by another shapes.py has other images or captions than the README's
    figures were measured on."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"shapes.py sha256 {code}, n {n}, seed {seed}, conversations {conversations}\n"


def demo_is_current(out: str | os.PathLike) -> bool:
    """Whether `out` holds the whole default demo set as this shapes.py makes it (--demo makes it again if not)."""
    stamp = Path(out) / DEMO_STAMP
    return stamp.is_file() and stamp.read_text(encoding="utf-8") == demo_stamp()


def _conversations(images: list[dict], labels: list[str], training: bool, rng: np.random.Generator) -> list[dict]:
    """LLaVA-Instruct-style conversations about `images` (whose captions are `labels`, in order)."""
    entries = []
    for index, (image, label) in enumerate(zip(images, labels)):
        if training and index % 10 == 9:  # a tenth of the training conversations are text only
            turns = [DEMO_TEXT_TURNS[i] for i in rng.permutation(len(DEMO_TEXT_TURNS))[: 1 + index % 2]]
            entries.append({"id": f"text_{index}", "conversations": _llava_turns(turns)})
            continue
        _, colour, shape, _, _, side = label.split()
        facts = {"colour": colour, "shape": f"a {shape}", "side": f"on the {side}"}
        # Every conversation asks all three, the side first, then colour and shape in either order (stopping
        # after one or two questions in training halved the practice at colour and shape, and some seeds' runs
        # then answered colours no better than 0.84).
        kinds = ["side"] + [["colour", "shape"][i] for i in rng.permutation(2)]
        turns = [(DEMO_QUESTIONS[k][0][rng.integers(2)], facts[k]) for k in kinds]
        if training and rng.random() < 0.25:  # a text-only turn inside an image conversation
            turns.insert(1 + rng.integers(len(turns)), DEMO_TEXT_TURNS[rng.integers(len(DEMO_TEXT_TURNS))])
        question, answer = turns[0]
        turns[0] = ("<image>\n" + question if rng.random() < 0.5 else question + "\n<image>", answer)
        entries.append({"id": f"talk_{image['id']}", "image": image["file_name"], "conversations": _llava_turns(turns)})
    return entries


def _llava_turns(turns: list[tuple[str, str]]) -> list[dict]:
    return [message for q, a in turns for message in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python shapes.py --out DIR [--n N] [--seed S]``."""
    parser = command_line()
    args = parser.parse_args(argv)
    try:
        summary = make_demo(args.out, n=args.n, seed=args.seed, conversations=args.conversations)
    except ValueError as error:  # --n / --conversations out of range
        parser.error(str(error))
    distinct = summary["distinct_captions"]
    print(
        f"wrote {summary['train']} train + {summary['val']} val captioned images and "
        f"{summary['conversations_train']} + {summary['conversations_val']} conversations to {args.out}; "
        f"{distinct} distinct balanced captions, chance level 1/{distinct} = {summary['chance_level']:.3f}"
    )


if __name__ == "__main__":
    main()
