"""Data sources -> samples, and the collator (the formats are read by sources.py, images loaded by processor.py;
the demo set is shapes.py's).

A sample is ``{"conversation": [{"role": "user"|"assistant", "content": str}, ...], "images": [...], "id": ...}``;
the user text holds ``IMAGE_TOKEN`` once per image, in order. Text-only samples have ``"images": []``.

Entry points (train.py hands the dataset and ``Collator`` to transformers' Trainer; evaluate.py, bench.py and a
hand-written loop use ``make_dataloader``)::

    dataset = make_dataset(config, seed=0, base_dir=None).attach(processor)   # -> ConversationDataset
    loader = make_dataloader(dataset, Collator(processor), batch_size=8, shuffle=True, num_workers=2, seed=0)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)          # before iterating: instructions/captions are redrawn per epoch
        for batch in loader:
            bad = int(batch.pop("num_bad_images")) + int(batch.pop("num_bad_records"))  # not model inputs
            ...

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
import dataclasses
import io
import logging
import operator
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from config import is_int

# Image decoding and the word tokenizer live with the processor (they know no data source); re-exported here.
from processor import (  # noqa: F401
    IMAGE_TOKEN,
    PHI3_SPECIAL_TOKENS,
    BadImageError,
    build_word_tokenizer,
    load_image,
)
from sources import BadRecordError, Record, read_cc_sbu_align, read_coco, read_llava  # noqa: F401  (re-exported)

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
# The skipped-sample counts a sample and a batch carry besides the model inputs, with what each counts.
SKIPPED = {"num_bad_images": "bad image(s)", "num_bad_records": "bad record(s)"}


def skipped_name(key: str) -> str:
    """The name a SKIPPED count is logged under (tensorboard, trainer_state.json): bad_images_skipped, ..."""
    return f"{key.removeprefix('num_')}_skipped"


class PackedRecords(Sequence):
    """Records pickled one after another into a single bytes object: a read-only sequence of ``Record``.

    DataLoader workers are forked copies of the training process, and reading a Python object writes its reference
    count, so a list of records is copied page by page into every worker as an epoch touches its records
    (pytorch/pytorch#13246). Measured with a file of llava_v1_5_mix665k.json's size, 4 workers took one process's
    memory from 3.8 GB to 12.3 GB within an epoch. A bytes object and an offsets array are two objects, whatever
    the number of records: the workers share them.
    """

    # A record is stored as the tuple of its fields: pickled 2-3 times faster than the dataclass, and smaller.
    _fields = operator.attrgetter(*(field.name for field in dataclasses.fields(Record)))

    def __init__(self, records: Iterable[Record] = ()) -> None:
        buffer, ends = io.BytesIO(), []
        for record in records:
            pickle.dump(self._fields(record), buffer, protocol=pickle.HIGHEST_PROTOCOL)
            ends.append(buffer.tell())
        self._buffer = buffer.getvalue()
        self._ends = np.array(ends, dtype=np.int64)

    @classmethod
    def join(cls, parts: Sequence[PackedRecords]) -> PackedRecords:
        """The records of `parts`, in order, without unpacking them."""
        joined, shift = cls(), 0
        joined._buffer = b"".join(part._buffer for part in parts)
        ends = []
        for part in parts:
            ends.append(part._ends + shift)
            shift += len(part._buffer)
        joined._ends = np.concatenate([joined._ends, *ends])
        return joined

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return Record(*pickle.loads(self._buffer[start : int(self._ends[index])]))


class ConversationDataset(Dataset):
    """Map-style dataset of samples; instructions/captions are drawn per (seed, epoch, index), images loaded.

    A sample that cannot be used is replaced by the next usable one, named once (per training process, DataLoader
    workers included, over all epochs) and counted in
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
        _check_policies(on_bad_image, on_bad_record)
        if not records:
            where = f"{source}: " if isinstance(source, (str, os.PathLike)) else ""
            raise ValueError(f"{where}no usable samples (all missing, malformed, or an empty annotation file)")
        self.records = records if isinstance(records, PackedRecords) else PackedRecords(records)
        self.seed = seed
        self.on_bad_image, self.on_bad_record = on_bad_image, on_bad_record
        # (first index, file) of each source, for naming a record's file: one file, or several after make_dataset
        self.sources = source if isinstance(source, list) else [(0, str(source) if source is not None else "data")]
        self.epoch = 0
        self.processor = None
        self._bad_count = 0
        self._warned: set[str] = set()
        self._named = _shared_flags(len(self.records))

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose instructions/captions ``__getitem__`` draws (call before creating the iterator)."""
        self.epoch = epoch

    def attach(self, processor: Any) -> ConversationDataset:
        """Use the processor that will collate the samples: each is checked against it (placeholders, length) as
        it is drawn, and a bad one replaced by the next, as on_bad_record says."""
        self.processor = processor
        return self

    def source_of(self, index: int) -> str:
        """The file record `index` was read from."""
        starts = [start for start, _ in self.sources]
        return self.sources[bisect.bisect_right(starts, index % len(self)) - 1][1]

    def subset(self, indices: Sequence[int]) -> ConversationDataset:
        """The same dataset (settings, attached processor) over the records at `indices`, in that order."""
        subset = copy.copy(self)
        subset.records = PackedRecords(self.records[i] for i in indices)
        subset.sources = []
        for position, index in enumerate(indices):  # a new entry only where the file changes
            name = self.source_of(index)
            if not subset.sources or subset.sources[-1][1] != name:
                subset.sources.append((position, name))
        subset.sources = subset.sources or self.sources[:1]
        subset._named = _shared_flags(len(subset.records))  # flags by record index: the subset's are its own
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
        counts, problem = dict.fromkeys(SKIPPED, 0), None
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
                self._note("skipping record", problem, index + attempt)
                continue
            try:
                sample["images"] = [load_image(path, short_side) for path in sample["images"]]
            except BadImageError as error:
                if self.on_bad_image == "error":
                    raise
                problem = error
                counts["num_bad_images"] += 1
                self._bad_count += 1
                self._note("skipping bad image", error, index + attempt)
                continue
            return sample | counts
        # Nothing usable in a long run of samples: the data (or max_length) is wrong, not one file.
        error = BadRecordError if counts["num_bad_records"] >= counts["num_bad_images"] else BadImageError
        raise error(
            f"{self.source_of(index)}: samples {index}.. : {sum(counts.values())} consecutive samples are unusable "
            f"({counts['num_bad_images']} bad image(s), {counts['num_bad_records']} bad record(s); the last: "
            f"{problem}); giving up"
        )

    def _note(self, what: str, error: Exception, index: int) -> None:
        # Once per record for the process's whole life: DataLoader workers are forked anew for each epoch and
        # each evaluation, as copies of a process that loaded nothing, so a worker's own memory of what it named
        # dies with it; the flags live in shared memory, which every worker writes and the next ones read.
        # Several records of one bad image (its captions, the conversations about it) are named once per worker.
        message, index = str(error), index % len(self)
        if message not in self._warned and not self._named[index]:
            logger.warning("%s: %s", what, message)
        self._warned.add(message)
        self._named[index] = True


def _shared_flags(count: int) -> torch.Tensor:
    """`count` booleans, all false, in shared memory: a forked (or spawned) DataLoader worker writes this very
    memory, not a copy of it. Where none can be had, this process's own (each worker then names a file again)."""
    flags = torch.zeros(count, dtype=torch.bool)
    try:
        return flags.share_memory_()
    except RuntimeError:  # /dev/shm full or absent, or the open-file limit reached (one descriptor per dataset):
        return flags  # fewer repeated warnings are not worth a data set that cannot be built


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
        sources, size = [], 0
        for part in parts:
            sources += [(size + start, name) for start, name in part.sources]
            size += len(part)
        records = PackedRecords.join([part.records for part in parts])
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
    _check_policies(on_bad_image, on_bad_record)
    if max_samples is not None and (not is_int(max_samples) or max_samples <= 0):
        raise ValueError(f"max_samples must be a positive integer (or null for all), got {max_samples!r}")
    if kind == "coco":
        source = path("annotation_file")
        records = read_coco(source, path("image_directory"), per_image, on_bad_record, on_bad_image)
    elif kind == "cc_sbu_align":
        source = path("data_dir") / "filter_cap.json"
        records = read_cc_sbu_align(path("data_dir"), per_image, on_bad_record, on_bad_image)
    else:
        source = path("annotation_file")
        records = read_llava(source, path("image_directory"), on_bad_record, on_bad_image)
    if max_samples is not None:
        records = records[: _cut_between_images(records, max_samples) if per_image == "all" else max_samples]
    return ConversationDataset(
        records, seed=seed, on_bad_image=on_bad_image, on_bad_record=on_bad_record, source=source
    )


def _cut_between_images(records: list, max_samples: int) -> int:
    """Where max_samples cuts a `captions_per_image: all` source (one record per caption, an image's together):
    before an image whose captions would not all fit, as an image's captions are also its references in
    evaluation, and a cut inside one scored it against part of them."""
    cut = min(max_samples, len(records))
    while 0 < cut < len(records) and records[cut].id == records[cut - 1].id:
        cut -= 1
    if cut == 0:  # the first image alone has more captions than max_samples: all of them
        cut = 1
        while cut < len(records) and records[cut].id == records[0].id:
            cut += 1
    return cut


def _check_policies(on_bad_image: str, on_bad_record: str) -> None:
    for name, policy in (("on_bad_image", on_bad_image), ("on_bad_record", on_bad_record)):
        if policy not in POLICIES:
            raise ValueError(f"{name} must be 'skip' or 'error', got {policy!r}")


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
        for key in SKIPPED:
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
