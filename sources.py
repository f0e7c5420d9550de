"""Data sources -> records: the COCO captions, cc_sbu_align and LLaVA-Instruct formats read and checked.

A record is one sample before its per-epoch choices (dataset.py draws the instruction and caption, and loads the
images). Each reader checks every entry of its file: malformed, empty or unanswerable entries, text holding a Phi-3
control token, and entries whose image files are missing, are excluded and named in one warning line per file (example
ids), or stop the run at the first, naming the file and the record (``on_bad_record: "error"``; for missing image
files ``on_bad_image: "error"``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor import IMAGE_TOKEN, BadImageError

logger = logging.getLogger("dataset")  # one logger for the data pipeline: readers and dataset alike


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
    with open(_require(path, what), "rb") as handle:
        data = handle.read()
    if data[:2] == b"\x1f\x8b":
        raise ValueError(f"{path}: expected {what}, but it is gzip-compressed (gunzip it first)")
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark, as some editors write, is skipped
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: expected {what} in UTF-8, but byte {error.start} is not UTF-8 ({error})") from error
    del data  # llava_v1_5_mix665k.json is 1 GB: not held twice while its objects are built
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: expected {what}, but it is not valid JSON ({error})") from error


def _drop_missing(records: list[Record], source: Path, on_bad_image: str = "skip") -> list[Record]:
    """Keep records whose image files all exist; report the rest in one warning line (or error, by policy)."""
    # One directory listing per folder is far cheaper than a stat per file on big or networked data sets.
    listings: dict[str, set[str]] = {}

    def exists(file: str) -> bool:
        folder, name = os.path.split(file)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        return name in listings[folder]

    files = {file for record in records for file in record.images}
    missing = sorted(file for file in files if not exists(file))
    if missing and on_bad_image == "error":
        raise BadImageError(
            f"{source}: {len(missing)} of {len(files)} image file(s) missing, e.g. {missing[0]} "
            "(on_bad_image: skip excludes their samples)"
        )
    if missing:
        lost = set(missing)
        records = [record for record in records if lost.isdisjoint(record.images)]
        logger.warning(
            "%s: %d of %d image file(s) missing, their samples excluded (e.g. %s)",
            source,
            len(missing),
            len(files),
            missing[0],
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


# Text like "<|end|>" would be read by Phi-3's tokenizer as its control token: an answer would teach to stop
# mid-sentence, and a stray "<|placeholder1|>" would take an image's place. Such text is rejected, not trained on.
CONTROL_TOKEN = re.compile(r"<\|\w+\|>|</?s>|<unk>")
CONTROL_REASON = "texts holding a control token such as <|end|> (the tokenizer would read it as markup)"


def _text_problem(text: str) -> str | None:
    """Why a caption or turn cannot be trained on, if it cannot: a control token, or text that is not Unicode."""
    if CONTROL_TOKEN.search(text):
        return CONTROL_REASON
    try:  # JSON's "\ud83d" escape without its pair (a cut emoji) decodes, but no tokenizer takes it
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "texts that are not valid Unicode (a lone surrogate such as half an emoji)"
    return None


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
    on_bad_image: str = "skip",
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
            rejected.add("image entries without an id (int or string) and a file_name", f"images[{position}]")
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
        elif problem := _text_problem(caption):
            rejected.add(problem, annotation.get("id", f"annotations[{position}]"))
        elif str(annotation["image_id"]) not in listed:
            rejected.add("annotations of an image id not in 'images'", annotation.get("id", f"annotations[{position}]"))
        elif str(annotation["image_id"]) in files:
            captions[str(annotation["image_id"])].append((_id_order(annotation.get("id", position)), caption))
    rejected.report("entries")
    kept = {ids[key]: [text for _, text in sorted(captions[key])] for key in files if captions.get(key)}
    files = {ids[key]: file for key, file in files.items()}
    return _drop_missing(_caption_records(kept, files, captions_per_image), annotation_file, on_bad_image)


def read_cc_sbu_align(
    data_dir: str | os.PathLike,
    captions_per_image: str = "one",
    on_bad_record: str = "skip",
    on_bad_image: str = "skip",
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
        elif problem := _text_problem(caption):
            rejected.add(problem, annotation["image_id"])
        else:
            captions[annotation["image_id"]].append(caption)
    rejected.report("entries")
    files = {key: str(data_dir / "image" / f"{key}.jpg") for key in captions}
    return _drop_missing(_caption_records(captions, files, captions_per_image), annotation_file, on_bad_image)


_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# LLaVA puts "<image>\n" before (or "\n<image>" after) the question; the newline belongs to the marker.
_LLAVA_IMAGE = re.compile(r"[ \t]*\n?[ \t]*<image>[ \t]*\n?[ \t]*")


def _llava_text(text: str) -> str:
    if "<image>" not in text:  # most turns: the regex would try its leading blanks at every character (slow)
        return text.strip()

    def replace(match: re.Match) -> str:
        before = " " if match.start() > 0 else ""
        after = " " if match.end() < len(match.string) else ""
        return before + IMAGE_TOKEN + after

    return _LLAVA_IMAGE.sub(replace, text).strip()


def _llava_turns(entry: Any) -> tuple[str | None, list, list]:
    """(problem, images, turns) of one LLaVA entry; leading gpt turns are dropped, as LLaVA's own loader does."""
    if not isinstance(entry, dict):
        return "entries that are not JSON objects", [], []
    images = entry.get("image")  # absent or null: a text-only sample; "" is a broken file name, not that
    images = [] if images is None else [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(name, str) and name for name in images):
        return "entries whose 'image' is not a file name", [], []
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        return "entries without a 'conversations' list", [], []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            found = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            return f"conversations with a turn that is not {{'from', 'value'}} (found {found})", [], []
        if turn["from"] not in _LLAVA_ROLES:
            return f"conversations with a turn from {turn['from']!r} (expected human or gpt)", [], []
        if not isinstance(turn["value"], str):
            return f"conversations with a turn whose value is {type(turn['value']).__name__}, not text", [], []
        if problem := _text_problem(turn["value"]):
            return problem, [], []
    if not turns:
        return "empty conversations (no turns)", [], []
    turns = [(_LLAVA_ROLES[turn["from"]], turn["value"]) for turn in turns]
    while turns and turns[0][0] == "assistant":
        turns = turns[1:]
    if not turns:
        return "conversations of gpt turns only (no question)", [], []
    if all(role == "user" for role, _ in turns):
        return "conversations without a gpt turn (nothing to learn)", [], []
    answers = [value for role, value in turns if role == "assistant"]
    if any(not value.strip() for value in answers):
        return "conversations with an empty gpt answer", [], []
    if any("<image>" in value for value in answers):  # its image tokens would be trained as answer text
        return "conversations with <image> in a gpt turn (an image belongs in a question)", [], []
    markers = sum(value.count("<image>") for _, value in turns)
    if images and markers == 0:
        # LLaVA's own loader puts the image before the first question when the text omits the marker.
        turns[0] = ("user", "<image>\n" + turns[0][1])
        markers = 1
    if markers != len(images):
        return "conversations whose <image> count != images", [], []
    return None, images, turns


def read_llava(
    annotation_file: str | os.PathLike,
    image_directory: str | os.PathLike | None,
    on_bad_record: str = "skip",
    on_bad_image: str = "skip",
) -> list[Record]:
    """Conversation records from LLaVA-Instruct JSON; entries without ``image`` become text-only samples.

    Malformed entries (not an object, no conversations, null values, an ``image`` that is not a file name, no
    question or no answer, an empty answer, ``<image>`` in an answer, marker/image count mismatch, a control token such
    as ``<|end|>`` in the text) are excluded and named in one warning line.
    """
    annotation_file = Path(annotation_file)
    if image_directory is not None:
        _require(Path(image_directory), "the LLaVA image directory", directory=True)
    data = _read_json(annotation_file, "a LLaVA-Instruct JSON list")
    if not isinstance(data, list):
        raise ValueError(f"{annotation_file}: expected a JSON list of {{'id', 'image', 'conversations'}}")
    records, rejected, trimmed = [], _Rejected(annotation_file, on_bad_record), []
    directory = str(Path(image_directory or "."))  # joined by os.path: a Path per record took 10 s of 665k
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
        files = tuple(os.path.join(directory, name) for name in images)
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
    return _drop_missing(records, annotation_file, on_bad_image)
