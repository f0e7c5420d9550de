"""Data sources -> samples, the collator, and the synthetic demo set (image loading is processor.py's).

A sample is ``{"conversation": [{"role": "user"|"assistant", "content": str}, ...], "images": [...], "id": ...}``;
the user text holds ``IMAGE_TOKEN`` once per image, in order. Text-only samples have ``"images": []``.

Entry points for train.py::

    dataset = make_dataset(config, seed=0, base_dir=None)   # -> ConversationDataset
    loader = make_dataloader(dataset, Collator(processor), batch_size=8, shuffle=True, num_workers=2, seed=0)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)          # before iterating: instructions/captions are redrawn per epoch
        bad = 0
        for batch in loader:
            bad += int(batch.pop("num_bad_images"))   # pop before batch goes to the model
            ...
        log(f"{bad} bad images skipped this epoch")

``config`` keys (unknown keys are an error, to catch typos):
  - ``format``: ``"coco"`` | ``"cc_sbu_align"`` | ``"llava"``
  - coco: ``annotation_file`` (COCO captions JSON), ``image_directory``
  - cc_sbu_align: ``data_dir`` (holding ``filter_cap.json`` and ``image/{image_id}.jpg``)
  - llava: ``annotation_file`` (LLaVA-Instruct JSON), ``image_directory`` (may be omitted if all text-only)
  - optional: ``captions_per_image`` (``"one"`` default, or ``"all"``; caption formats only),
    ``on_bad_image`` (``"skip"`` default, or ``"error"``), ``max_samples`` (keep the first N samples).
Relative paths are resolved against ``base_dir`` (e.g. the config file's directory) when given.

Bad images: ``__getitem__`` returns the next usable sample instead (``on_bad_image="skip"``), logs one warning
per file and stores how many bad files it met in ``sample["num_bad_images"]``; ``Collator`` sums these into
``batch["num_bad_images"]`` (a 0-d long tensor). That key is the count to use: DataLoader workers are separate
processes, so ``dataset.bad_image_count()`` only sees loads done in the calling process (num_workers=0).

Demo set: ``python dataset.py make-demo --out DIR [--n N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

# Image decoding and the word tokenizer live with the processor (they know no data source); re-exported here.
from processor import (  # noqa: F401
    IMAGE_TOKEN,
    MAX_IMAGE_PIXELS,
    PHI3_SPECIAL_TOKENS,
    BadImageError,
    build_word_tokenizer,
    load_image,
)

logger = logging.getLogger(__name__)

CAPTION_INSTRUCTIONS = (
    "Can you create a description for this photo?",
    "Describe this image.",
    "What is shown in this picture?",
    "Write a caption for this image.",
    "Give a short description of this photo.",
    "What do you see in this image?",
    "Summarize the content of this picture.",
    "Provide a caption for this photo.",
    "Tell me what this image shows.",
    "Describe the scene in this photo.",
)

# How many following samples to try before concluding the data set is mostly broken.
MAX_REPLACEMENTS = 50


@dataclass(frozen=True, slots=True)
class Record:
    """One sample before per-epoch choices: either candidate ``captions`` or a fixed ``conversation``."""

    id: Any
    images: tuple[str, ...]
    captions: tuple[str, ...] = ()
    conversation: tuple[tuple[str, str], ...] = ()


def _require(path: Path, what: str, directory: bool = False) -> Path:
    if not (path.is_dir() if directory else path.is_file()):
        raise FileNotFoundError(f"{path}: expected {what}, but no such {'directory' if directory else 'file'}")
    return path


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(_require(path, what), encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: expected {what}, but it is not valid JSON ({error})") from error


def _drop_missing(records: list[Record], source: Path) -> list[Record]:
    """Keep records whose image files all exist; report the rest in one warning line."""
    # One directory listing per folder is far cheaper than a stat per file on big or networked data sets.
    listings: dict[str, set[str]] = {}

    def exists(file: str) -> bool:
        folder, name = os.path.split(file)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return name in listings[folder]

    missing = sorted({file for record in records for file in record.images if not exists(file)})
    if missing:
        lost = set(missing)
        records = [record for record in records if lost.isdisjoint(record.images)]
        logger.warning(
            "%s: %d image file(s) missing, their samples excluded (e.g. %s)", source, len(missing), missing[0]
        )
    return records


def _caption_records(
    captions: Mapping[Any, list[str]], image_files: Mapping[Any, str], captions_per_image: str
) -> list[Record]:
    if captions_per_image == "one":
        return [Record(key, (image_files[key],), tuple(texts)) for key, texts in captions.items()]
    if captions_per_image == "all":
        return [Record(key, (image_files[key],), (text,)) for key, texts in captions.items() for text in texts]
    raise ValueError(f"captions_per_image must be 'one' or 'all', got {captions_per_image!r}")


def read_coco(
    annotation_file: str | os.PathLike, image_directory: str | os.PathLike, captions_per_image: str = "one"
) -> list[Record]:
    """Caption records from a COCO captions JSON; images missing on disk are reported and excluded."""
    annotation_file, image_directory = Path(annotation_file), Path(image_directory)
    _require(image_directory, "the COCO image directory", directory=True)
    data = _read_json(annotation_file, "a COCO captions JSON file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotation_file}: expected a COCO captions JSON with 'images' and 'annotations'")
    files = {image["id"]: str(image_directory / image["file_name"]) for image in data["images"]}
    captions: dict[Any, list[str]] = defaultdict(list)
    for annotation in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
        captions[annotation["image_id"]].append(annotation["caption"].strip())
    kept = {key: captions[key] for key in files if captions.get(key)}
    return _drop_missing(_caption_records(kept, files, captions_per_image), annotation_file)


def read_cc_sbu_align(data_dir: str | os.PathLike, captions_per_image: str = "one") -> list[Record]:
    """Caption records from MiniGPT-4's stage-two set: ``filter_cap.json`` + ``image/{image_id}.jpg``."""
    data_dir = Path(data_dir)
    _require(data_dir / "image", "cc_sbu_align's image directory", directory=True)
    annotation_file = data_dir / "filter_cap.json"
    data = _read_json(annotation_file, "cc_sbu_align's filter_cap.json")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{annotation_file}: expected {{'annotations': [{{'image_id', 'caption'}}, ...]}}")
    captions: dict[Any, list[str]] = defaultdict(list)
    for annotation in data["annotations"]:
        captions[annotation["image_id"]].append(annotation["caption"].strip())
    files = {key: str(data_dir / "image" / f"{key}.jpg") for key in captions}
    return _drop_missing(_caption_records(captions, files, captions_per_image), annotation_file)


_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# LLaVA puts "<image>\n" before (or "\n<image>" after) the question; the newline belongs to the marker.
_LLAVA_IMAGE = re.compile(r"[ \t]*\n?[ \t]*<image>[ \t]*\n?[ \t]*")


def _llava_text(text: str) -> str:
    def replace(match: re.Match) -> str:
        before = " " if match.start() > 0 else ""
        after = " " if match.end() < len(match.string) else ""
        return before + IMAGE_TOKEN + after

    return _LLAVA_IMAGE.sub(replace, text).strip()


def read_llava(annotation_file: str | os.PathLike, image_directory: str | os.PathLike | None) -> list[Record]:
    """Conversation records from LLaVA-Instruct JSON; entries without ``image`` become text-only samples."""
    annotation_file = Path(annotation_file)
    if image_directory is not None:
        _require(Path(image_directory), "the LLaVA image directory", directory=True)
    data = _read_json(annotation_file, "a LLaVA-Instruct JSON list")
    if not isinstance(data, list):
        raise ValueError(f"{annotation_file}: expected a JSON list of {{'id', 'image', 'conversations'}}")
    records, malformed = [], []
    for position, entry in enumerate(data):
        images = entry.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        turns = [(_LLAVA_ROLES.get(turn.get("from")), turn.get("value", "")) for turn in entry["conversations"]]
        markers = sum(value.count("<image>") for _, value in turns)
        if images and markers == 0 and turns and turns[0][0] == "user":
            # LLaVA's own loader puts the image before the first question when the text omits the marker.
            turns[0] = ("user", "<image>\n" + turns[0][1])
            markers = 1
        if markers != len(images) or any(role is None for role, _ in turns) or not turns:
            malformed.append(entry.get("id", position))
            continue
        if images and image_directory is None:
            raise ValueError(f"{annotation_file}: has image samples, so image_directory is required")
        files = tuple(str(Path(image_directory) / name) for name in images)
        conversation = tuple((role, _llava_text(value)) for role, value in turns)
        records.append(Record(entry.get("id", position), files, conversation=conversation))
    if malformed:
        message = "%s: %d conversation(s) with unknown roles or <image> count != images excluded (e.g. id %s)"
        logger.warning(message, annotation_file, len(malformed), malformed[0])
    return _drop_missing(records, annotation_file)


class ConversationDataset(Dataset):
    """Map-style dataset of samples; instructions/captions are drawn per (seed, epoch, index), images loaded."""

    def __init__(self, records: Sequence[Record], *, seed: int = 0, on_bad_image: str = "skip") -> None:
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
        if not records:
            raise ValueError("no usable samples (all missing, malformed, or an empty annotation file)")
        self.records = list(records)
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.epoch = 0
        self._bad_count = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose instructions/captions ``__getitem__`` draws (call before creating the iterator)."""
        self.epoch = epoch

    def bad_image_count(self) -> int:
        """Bad image files met by this process so far (with DataLoader workers use ``batch['num_bad_images']``)."""
        return self._bad_count

    def sample(self, index: int, epoch: int | None = None) -> dict:
        """The sample at ``index`` with image paths, not loaded (cheap; for evaluation and inspection)."""
        record = self.records[index]
        if record.conversation:
            conversation = [{"role": role, "content": content} for role, content in record.conversation]
        else:
            rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])
            instruction = CAPTION_INSTRUCTIONS[rng.integers(len(CAPTION_INSTRUCTIONS))]
            caption = record.captions[rng.integers(len(record.captions))]
            conversation = [
                {"role": "user", "content": f"{instruction} {IMAGE_TOKEN}"},
                {"role": "assistant", "content": caption},
            ]
        return {"conversation": conversation, "images": list(record.images), "id": record.id}

    def __getitem__(self, index: int) -> dict:
        bad = 0
        for attempt in range(min(len(self), MAX_REPLACEMENTS + 1)):
            sample = self.sample((index + attempt) % len(self))
            try:
                sample["images"] = [load_image(path) for path in sample["images"]]
            except BadImageError as error:
                if self.on_bad_image == "error":
                    raise
                bad += 1
                self._note_bad(error)
                continue
            sample["num_bad_images"] = bad
            return sample
        raise BadImageError(f"samples {index}.. : {bad} consecutive samples have bad images; giving up")

    def _note_bad(self, error: BadImageError) -> None:
        self._bad_count += 1
        message = str(error)
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("skipping bad image: %s", message)


# format -> (required keys, optional keys)
_CONFIG_KEYS = {
    "coco": ({"annotation_file", "image_directory"}, {"captions_per_image"}),
    "cc_sbu_align": ({"data_dir"}, {"captions_per_image"}),
    "llava": ({"annotation_file"}, {"image_directory"}),
}
_COMMON_KEYS = {"format", "on_bad_image", "max_samples"}


def make_dataset(
    config: Mapping[str, Any], *, seed: int = 0, base_dir: str | os.PathLike | None = None
) -> ConversationDataset:
    """Build a ConversationDataset from a config dict (keys in the module docstring)."""
    kind = config.get("format")
    if kind not in _CONFIG_KEYS:
        raise ValueError(f"dataset format must be one of {sorted(_CONFIG_KEYS)}, got {kind!r}")
    required, optional = _CONFIG_KEYS[kind]
    unknown = set(config) - required - optional - _COMMON_KEYS
    missing = required - set(config)
    if unknown or missing:
        raise ValueError(f"{kind} dataset config: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")

    def path(key: str) -> Path | None:
        value = config.get(key)
        return None if value is None else Path(base_dir or ".") / Path(value).expanduser()

    per_image, on_bad_image = config.get("captions_per_image", "one"), config.get("on_bad_image", "skip")
    # Checked here so a typo fails before a large annotation file is read.
    if per_image not in ("one", "all") or on_bad_image not in ("skip", "error"):
        raise ValueError(f"captions_per_image must be 'one'|'all' and on_bad_image 'skip'|'error', got {config}")
    if kind == "coco":
        records = read_coco(path("annotation_file"), path("image_directory"), per_image)
    elif kind == "cc_sbu_align":
        records = read_cc_sbu_align(path("data_dir"), per_image)
    else:
        records = read_llava(path("annotation_file"), path("image_directory"))
    if config.get("max_samples") is not None:
        records = records[: int(config["max_samples"])]
    return ConversationDataset(records, seed=seed, on_bad_image=on_bad_image)


class Collator:
    """Turns a list of samples into the processor's batch, plus ``num_bad_images`` (0-d long tensor)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, samples: list[dict]) -> dict:
        batch = dict(
            self.processor(
                conversations=[sample["conversation"] for sample in samples],
                images=[sample["images"] for sample in samples],
                padding_side="right",
                drop_unsupervised=True,
            )
        )
        bad = sum(sample.get("num_bad_images", 0) for sample in samples)
        batch["num_bad_images"] = torch.tensor(bad, dtype=torch.long)
        return batch


def make_dataloader(
    dataset: Dataset,
    collator: Collator,
    *,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` (not on ``num_workers``); pins memory under CUDA."""
    # Not persistent: each epoch's workers must get a fresh copy of the dataset to see set_epoch().
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collator,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


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
    """Command line: ``python dataset.py make-demo --out DIR [--n N] [--seed S]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("make-demo", help="write the synthetic shapes demo set")
    demo.add_argument("--out", required=True, help="output directory")
    demo.add_argument("--n", type=int, default=2400, help="total images (val gets 300, train the rest)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = make_demo(args.out, n=args.n, seed=args.seed)
    distinct = summary["distinct_captions"]
    print(
        f"wrote {summary['train']} train + {summary['val']} val images to {args.out}; {distinct} distinct balanced "
        f"captions, chance level 1/{distinct} = {summary['chance_level']:.3f}"
    )


if __name__ == "__main__":
    main()
