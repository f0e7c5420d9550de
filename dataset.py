"""Data sources -> samples, and the collator (image loading is processor.py's; the demo set is shapes.py's).

A sample is ``{"conversation": [{"role": "user"|"assistant", "content": str}, ...], "images": [...], "id": ...}``;
the user text holds ``IMAGE_TOKEN`` once per image, in order. Text-only samples have ``"images": []``.

Entry points for train.py::

    dataset = make_dataset(config, seed=0, base_dir=None)   # -> ConversationDataset
    loader = make_dataloader(dataset, Collator(processor), batch_size=8, shuffle=True, num_workers=2, seed=0)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)          # before iterating: instructions/captions are redrawn per epoch
        bad = 0
        for batch in loader:
            bad += int(batch.pop("num_bad_images")) + int(batch.pop("num_bad_records"))  # not model inputs
            ...
        log(f"{bad} bad samples skipped this epoch")

``config`` keys (unknown keys are an error, to catch typos):
  - ``format``: ``"coco"`` | ``"cc_sbu_align"`` | ``"llava"``
  - coco: ``annotation_file`` (COCO captions JSON), ``image_directory``
  - cc_sbu_align: ``data_dir`` (holding ``filter_cap.json`` and ``image/{image_id}.jpg``)
  - llava: ``annotation_file`` (LLaVA-Instruct JSON), ``image_directory`` (may be omitted if all text-only)
  - optional: ``captions_per_image`` (``"one"`` default, or ``"all"``; caption formats only),
    ``on_bad_image`` and ``on_bad_record`` (``"skip"`` default, or ``"error"``), ``max_samples`` (the first N).
Relative paths are resolved against ``base_dir`` (e.g. the config file's directory) when given.

Bad records are excluded when the file is read (malformed, empty, no answer...: one warning line per file naming
example ids). Bad samples: ``__getitem__`` returns the next usable sample instead (``on_bad_image``/``on_bad_record``
``"skip"``), logs one warning per problem and counts them in ``sample["num_bad_images"]`` /
``sample["num_bad_records"]`` (a record is checked against ``dataset.attach(processor)``: too long for max_length);
``Collator`` sums these into ``batch[...]`` (0-d long tensors). Those keys are the counts to use: DataLoader workers
are separate processes, so ``dataset.bad_image_count()`` only sees loads done in the calling process.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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


class BadRecordError(ValueError):
    """A data record that cannot be used: malformed, empty, or too long for model.max_length."""


class _Rejected:
    """Records a reader excludes, by reason: one warning line naming the file and example ids, or (policy
    'error') a BadRecordError at the first one."""

    def __init__(self, source: Path, policy: str) -> None:
        self.source, self.policy, self.ids = source, policy, defaultdict(list)

    def add(self, reason: str, record_id: Any) -> None:
        if self.policy == "error":
            raise BadRecordError(f"{self.source}: record {record_id!r}: {reason} (on_bad_record: skip excludes it)")
        self.ids[reason].append(record_id)

    def report(self, what: str) -> None:
        if self.ids:
            total = sum(map(len, self.ids.values()))
            details = "; ".join(
                f"{len(ids)} {reason} (e.g. id {', '.join(str(i) for i in ids[:5])})"
                for reason, ids in self.ids.items()
            )
            logger.warning("%s: %d %s excluded: %s", self.source, total, what, details)


def _usable_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool) and str(value) != ""


def _id_order(value: Any) -> tuple:
    # Numeric ids in numeric order; a file mixing int and str ids must still sort (str(10) < str(9) otherwise).
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def _caption_of(annotation: Any, key: str) -> str | None:
    if not isinstance(annotation, dict) or not _usable_id(annotation.get(key)):
        return None
    caption = annotation.get("caption")
    return caption.strip() if isinstance(caption, str) and caption.strip() else None


def read_coco(
    annotation_file: str | os.PathLike,
    image_directory: str | os.PathLike,
    captions_per_image: str = "one",
    on_bad_record: str = "skip",
) -> list[Record]:
    """Caption records from a COCO captions JSON; images missing on disk and malformed entries are reported and
    excluded (duplicate image ids, orphan or empty captions, entries without ids: named in one warning line)."""
    annotation_file, image_directory = Path(annotation_file), Path(image_directory)
    _require(image_directory, "the COCO image directory", directory=True)
    data = _read_json(annotation_file, "a COCO captions JSON file")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise ValueError(f"{annotation_file}: expected a COCO captions JSON with 'images' and 'annotations' lists")
    rejected = _Rejected(annotation_file, on_bad_record)
    files, ids, listed = {}, {}, Counter()  # keyed by str(id): a file may mix 7 and "7"
    for position, image in enumerate(data["images"]):
        if (
            not isinstance(image, dict)
            or not _usable_id(image.get("id"))
            or not isinstance(image.get("file_name"), str)
        ):
            rejected.add("image entries without an id and a file_name", f"images[{position}]")
            continue
        key = str(image["id"])
        listed[key] += 1
        files[key], ids[key] = str(image_directory / image["file_name"]), image["id"]
    for key in [key for key, count in listed.items() if count > 1]:
        del files[key]  # its captions could belong to either file
        rejected.add("image ids listed more than once", ids[key])
    captions: dict[str, list] = defaultdict(list)
    for position, annotation in enumerate(data["annotations"]):
        caption = _caption_of(annotation, "image_id")
        if caption is None:
            rejected.add("annotations without an image_id and a non-empty caption", f"annotations[{position}]")
        elif str(annotation["image_id"]) not in listed:
            rejected.add("annotations of an image id not in 'images'", annotation.get("id", f"annotations[{position}]"))
        elif str(annotation["image_id"]) in files:
            captions[str(annotation["image_id"])].append((_id_order(annotation.get("id", position)), caption))
    rejected.report("entries")
    kept = {ids[key]: [text for _, text in sorted(captions[key])] for key in files if captions.get(key)}
    files = {ids[key]: file for key, file in files.items()}
    return _drop_missing(_caption_records(kept, files, captions_per_image), annotation_file)


def read_cc_sbu_align(
    data_dir: str | os.PathLike, captions_per_image: str = "one", on_bad_record: str = "skip"
) -> list[Record]:
    """Caption records from MiniGPT-4's stage-two set: ``filter_cap.json`` + ``image/{image_id}.jpg``."""
    data_dir = Path(data_dir)
    _require(data_dir / "image", "cc_sbu_align's image directory", directory=True)
    annotation_file = data_dir / "filter_cap.json"
    data = _read_json(annotation_file, "cc_sbu_align's filter_cap.json")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{annotation_file}: expected {{'annotations': [{{'image_id', 'caption'}}, ...]}}")
    rejected = _Rejected(annotation_file, on_bad_record)
    captions: dict[Any, list[str]] = defaultdict(list)
    for position, annotation in enumerate(data["annotations"]):
        caption = _caption_of(annotation, "image_id")
        if caption is None:
            rejected.add("annotations without an image_id and a non-empty caption", f"annotations[{position}]")
        else:
            captions[annotation["image_id"]].append(caption)
    rejected.report("entries")
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


def _llava_turns(entry: Any) -> tuple[str | None, list, list]:
    """(problem, images, turns) of one LLaVA entry; leading gpt turns are dropped, as LLaVA's own loader does."""
    if not isinstance(entry, dict):
        return "entries that are not JSON objects", [], []
    images = entry.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(name, str) and name for name in images):
        return "entries whose 'image' is not a file name", [], []
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        return "entries without a 'conversations' list", [], []
    if not all(
        isinstance(t, dict) and t.get("from") in _LLAVA_ROLES and isinstance(t.get("value"), str) for t in turns
    ):
        return "conversations with a turn that is not {'from': human|gpt, 'value': text}", [], []
    if not turns:
        return "empty conversations (no turns)", [], []
    turns = [(_LLAVA_ROLES[turn["from"]], turn["value"]) for turn in turns]
    while turns and turns[0][0] == "assistant":
        turns = turns[1:]
    if not turns:
        return "conversations of gpt turns only (no question)", [], []
    if all(role == "user" for role, _ in turns):
        return "conversations without a gpt turn (nothing to learn)", [], []
    markers = sum(value.count("<image>") for _, value in turns)
    if images and markers == 0:
        # LLaVA's own loader puts the image before the first question when the text omits the marker.
        turns[0] = ("user", "<image>\n" + turns[0][1])
        markers = 1
    if markers != len(images):
        return "conversations whose <image> count != images", [], []
    return None, images, turns


def read_llava(
    annotation_file: str | os.PathLike, image_directory: str | os.PathLike | None, on_bad_record: str = "skip"
) -> list[Record]:
    """Conversation records from LLaVA-Instruct JSON; entries without ``image`` become text-only samples.

    Malformed entries (not an object, no conversations, null values, an ``image`` that is not a file name, no
    question or no answer, marker/image count mismatch) are excluded and named in one warning line.
    """
    annotation_file = Path(annotation_file)
    if image_directory is not None:
        _require(Path(image_directory), "the LLaVA image directory", directory=True)
    data = _read_json(annotation_file, "a LLaVA-Instruct JSON list")
    if not isinstance(data, list):
        raise ValueError(f"{annotation_file}: expected a JSON list of {{'id', 'image', 'conversations'}}")
    records, rejected, trimmed = [], _Rejected(annotation_file, on_bad_record), []
    for position, entry in enumerate(data):
        record_id = entry.get("id", position) if isinstance(entry, dict) else position
        problem, images, turns = _llava_turns(entry)
        if problem:
            rejected.add(problem, record_id)
            continue
        if images and image_directory is None:
            raise ValueError(f"{annotation_file}: has image samples, so image_directory is required")
        if len(turns) < len(entry["conversations"]):
            trimmed.append(record_id)
        files = tuple(str(Path(image_directory) / name) for name in images)
        conversation = tuple((role, _llava_text(value)) for role, value in turns)
        records.append(Record(record_id, files, conversation=conversation))
    rejected.report("conversation(s)")
    if trimmed:
        logger.warning(
            "%s: %d conversation(s) began with a gpt turn, which is dropped as LLaVA does (e.g. id %s)",
            annotation_file,
            len(trimmed),
            trimmed[0],
        )
    return _drop_missing(records, annotation_file)


class ConversationDataset(Dataset):
    """Map-style dataset of samples; instructions/captions are drawn per (seed, epoch, index), images loaded.

    A sample that cannot be used is replaced by the next usable one, named once (per process) and counted in
    ``sample["num_bad_images"]`` / ``sample["num_bad_records"]``, or raises with the policy "error": a bad image
    (missing, corrupt, too large or too elongated) or, once a processor is attached, a record whose text does not
    fit it (truncation would cut into the image, or no answer token would be left).
    """

    def __init__(
        self,
        records: Sequence[Record],
        *,
        seed: int = 0,
        on_bad_image: str = "skip",
        on_bad_record: str = "skip",
        source: str | os.PathLike | list[tuple[int, str]] | None = None,
    ) -> None:
        for name, policy in (("on_bad_image", on_bad_image), ("on_bad_record", on_bad_record)):
            if policy not in POLICIES:
                raise ValueError(f"{name} must be 'skip' or 'error', got {policy!r}")
        if not records:
            raise ValueError("no usable samples (all missing, malformed, or an empty annotation file)")
        self.records = list(records)
        self.seed = seed
        self.on_bad_image, self.on_bad_record = on_bad_image, on_bad_record
        # (first index, file) of each source, for naming a record's file: one file, or several after make_dataset
        self.sources = source if isinstance(source, list) else [(0, str(source) if source is not None else "data")]
        self.epoch = 0
        self.processor = None
        self._bad_count = 0
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose instructions/captions ``__getitem__`` draws (call before creating the iterator)."""
        self.epoch = epoch

    def attach(self, processor: Any) -> ConversationDataset:
        """Check every sample against the processor that will collate it (length, image size) before use."""
        self.processor = processor
        return self

    def source_of(self, index: int) -> str:
        """The file record `index` was read from."""
        starts = [start for start, _ in self.sources]
        return self.sources[bisect.bisect_right(starts, index % len(self)) - 1][1]

    def subset(self, indices: Sequence[int]) -> ConversationDataset:
        """The same dataset (settings, attached processor) over the records at `indices`, in that order."""
        subset = copy.copy(self)
        subset.records = [self.records[i] for i in indices]
        subset.sources = []
        for position, index in enumerate(indices):  # a new entry only where the file changes
            name = self.source_of(index)
            if not subset.sources or subset.sources[-1][1] != name:
                subset.sources.append((position, name))
        subset.sources = subset.sources or self.sources[:1]
        return subset

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
        counts = {"num_bad_images": 0, "num_bad_records": 0}
        short_side = self.processor.image_short_side if self.processor is not None else None
        for attempt in range(min(len(self), MAX_REPLACEMENTS + 1)):
            sample = self.sample((index + attempt) % len(self))
            try:
                if self.processor is not None:
                    self.processor.check(sample["conversation"], len(sample["images"]))
            except ValueError as error:
                problem = BadRecordError(f"{self.source_of(index + attempt)}: record {sample['id']!r}: {error}")
                if self.on_bad_record == "error":
                    raise problem from None
                counts["num_bad_records"] += 1
                self._note("skipping record", problem)
                continue
            try:
                sample["images"] = [load_image(path, short_side) for path in sample["images"]]
            except BadImageError as error:
                if self.on_bad_image == "error":
                    raise
                counts["num_bad_images"] += 1
                self._bad_count += 1
                self._note("skipping bad image", error)
                continue
            return sample | counts
        raise BadImageError(f"samples {index}.. : {sum(counts.values())} consecutive samples are unusable; giving up")

    def _note(self, what: str, error: Exception) -> None:
        message = str(error)
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("%s: %s", what, message)


POLICIES = ("skip", "error")
# format -> (required keys, optional keys)
_CONFIG_KEYS = {
    "coco": ({"annotation_file", "image_directory"}, {"captions_per_image"}),
    "cc_sbu_align": ({"data_dir"}, {"captions_per_image"}),
    "llava": ({"annotation_file"}, {"image_directory"}),
}
_COMMON_KEYS = {"format", "on_bad_image", "on_bad_record", "max_samples"}


def make_dataset(
    config: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, seed: int = 0, base_dir: str | os.PathLike | None = None
) -> ConversationDataset:
    """Build a ConversationDataset from a config dict (keys in the module docstring), or from a list of them: one
    dataset over all their records, in order (e.g. COCO captions and LLaVA conversations). The sources of a list
    share the split's on_bad_image / on_bad_record policies."""
    if isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        if not config:
            raise ValueError("an empty list of data sources")
        parts = [make_dataset(source, seed=seed, base_dir=base_dir) for source in config]
        policies = {(part.on_bad_image, part.on_bad_record) for part in parts}
        if len(policies) > 1:
            raise ValueError(f"the sources of one split must share on_bad_image and on_bad_record, got {policies}")
        records, sources = [], []
        for part in parts:
            sources += [(len(records) + start, name) for start, name in part.sources]
            records += part.records
        ((on_bad_image, on_bad_record),) = policies
        return ConversationDataset(
            records, seed=seed, on_bad_image=on_bad_image, on_bad_record=on_bad_record, source=sources
        )
    if not isinstance(config, Mapping):
        raise ValueError(f"a data source is a mapping with a 'format' key, got {config!r}")
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
        return None if value is None else Path(base_dir or ".") / Path(os.path.expandvars(value)).expanduser()

    per_image = config.get("captions_per_image", "one")
    on_bad_image, on_bad_record = config.get("on_bad_image", "skip"), config.get("on_bad_record", "skip")
    max_samples = config.get("max_samples")
    # Checked here so a typo fails before a large annotation file is read.
    if per_image not in ("one", "all"):
        raise ValueError(f"captions_per_image must be 'one' or 'all', got {per_image!r}")
    for name, policy in (("on_bad_image", on_bad_image), ("on_bad_record", on_bad_record)):
        if policy not in POLICIES:
            raise ValueError(f"{name} must be 'skip' or 'error', got {policy!r}")
    if max_samples is not None and (
        not isinstance(max_samples, int) or isinstance(max_samples, bool) or max_samples <= 0
    ):
        raise ValueError(f"max_samples must be a positive integer (or null for all), got {max_samples!r}")
    if kind == "coco":
        source = path("annotation_file")
        records = read_coco(source, path("image_directory"), per_image, on_bad_record)
    elif kind == "cc_sbu_align":
        source = path("data_dir") / "filter_cap.json"
        records = read_cc_sbu_align(path("data_dir"), per_image, on_bad_record)
    else:
        source = path("annotation_file")
        records = read_llava(source, path("image_directory"), on_bad_record)
    if max_samples is not None:
        records = records[:max_samples]
    return ConversationDataset(
        records, seed=seed, on_bad_image=on_bad_image, on_bad_record=on_bad_record, source=source
    )


class Collator:
    """Turns a list of samples into the processor's batch, plus ``num_bad_images``/``num_bad_records`` (0-d)."""

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
        for key in ("num_bad_images", "num_bad_records"):
            batch[key] = torch.tensor(sum(sample.get(key, 0) for sample in samples), dtype=torch.long)
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
