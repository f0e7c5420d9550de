"""dataset.py: readers, robust image loading, bad-image policy, collation, the demo set and DataLoader determinism."""

from __future__ import annotations

import gzip
import io
import json
import logging
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as D
import shapes

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = SHARED_DATA / "coco"
PHI3_TOKENIZER = SHARED_DATA / "phi3_tokenizer"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not present (shared test data lives beside the checkout)")
    return path


def supervised_segments(labels: torch.Tensor) -> list[list[int]]:
    """Runs of consecutive supervised (!= -100) label ids in one row."""
    segments, current = [], []
    for value in labels.tolist():
        if value == -100:
            if current:
                segments.append(current)
            current = []
        else:
            current.append(value)
    return segments + ([current] if current else [])


def image_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the runs of image-token ids in one row."""
    runs, length = [], 0
    for value in input_ids.tolist() + [None]:
        if value == image_token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


@pytest.fixture
def tiny_processor(make_model):
    return make_model().processor


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    shapes.make_demo(out, n=340, seed=0, conversations=240)
    return out


# ----------------------------------------------------------------------------------------------- COCO


def coco_config(annotations: str, images: str = "val2017", **extra) -> dict:
    return {
        "format": "coco",
        "annotation_file": str(shared(COCO / "annotations" / annotations)),
        "image_directory": str(COCO / "images" / images),
        **extra,
    }


def test_coco_mini_counts_and_missing_report(caplog):
    with caplog.at_level(logging.WARNING, logger="dataset"):
        one = D.make_dataset(coco_config("captions_val2017_mini.json", captions_per_image="one"))
    # Only 4 of the 79 mini-val images are on disk; the one warning line names the count and an example file.
    (record,) = [r for r in caplog.records if "missing" in r.getMessage()]
    assert " 75 of 79 image file(s) missing" in record.getMessage() and ".jpg" in record.getMessage()
    assert len(one) == 4
    with pytest.raises(
        D.BadImageError, match=r"captions_val2017_mini.json: 75 of 79 image file\(s\) missing, e.g. .*jpg"
    ):
        D.make_dataset(coco_config("captions_val2017_mini.json", on_bad_image="error"))  # as for a corrupt file
    all_captions = D.make_dataset(coco_config("captions_val2017_mini.json", captions_per_image="all"))
    assert len(all_captions) == 20
    assert {s["id"] for s in (all_captions.sample(i) for i in range(20))} == {r.id for r in one.records}


def test_coco_samples_have_instruction_placeholder_and_caption():
    ds = D.make_dataset(coco_config("captions_val2017_mini.json"))
    for index in range(len(ds)):
        sample = ds.sample(index)
        user, assistant = sample["conversation"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        instruction, placeholder = user["content"].rsplit(" ", 1)
        assert instruction in D.CAPTION_INSTRUCTIONS and placeholder == D.IMAGE_TOKEN
        assert assistant["content"] in ds.records[index].captions
        assert len(sample["images"]) == 1 and Path(sample["images"][0]).is_file()
    loaded = ds[0]
    assert loaded["images"][0].mode == "RGB" and loaded["num_bad_images"] == 0


def test_coco_collates_with_real_phi3_tokenizer(make_model):
    from transformers import AutoTokenizer

    from model import PhiClipProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(shared(PHI3_TOKENIZER)))
    processor = PhiClipProcessor(tokenizer, make_model().image_processor, num_image_tokens=5)
    ds = D.make_dataset(coco_config("captions_val2017_mini.json", captions_per_image="all"))
    collate = D.Collator(processor)
    samples = [ds[i] for i in range(len(ds))]
    batch = collate(samples)
    assert batch["pixel_values"].shape[0] == len(samples) and int(batch["num_bad_images"]) == 0
    for row, sample in enumerate(samples):
        assert image_runs(batch["input_ids"][row], processor.image_token_id) == [5]
        (segment,) = supervised_segments(batch["labels"][row])
        expected = sample["conversation"][1]["content"] + "<|end|>"
        assert tokenizer.decode(segment).strip() == expected


def test_full_coco_val_loads(caplog):
    with caplog.at_level(logging.WARNING, logger="dataset"):
        ds = D.make_dataset(coco_config("captions_val2017.json", captions_per_image="all"))
    # 12 of its 5000 images are on disk, each with 5 captions; the other 4988 are reported once.
    assert len(ds) == 60
    assert any(" 4988 " in r.getMessage() for r in caplog.records)


def test_missing_paths_fail_at_construction(tmp_path):
    annotations = shared(COCO / "annotations" / "captions_val2017_mini.json")
    with pytest.raises(FileNotFoundError, match="image directory"):
        D.read_coco(annotations, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="COCO captions JSON"):
        D.read_coco(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="'images' and 'annotations'"):
        D.read_coco(tmp_path / "bad.json", tmp_path)


def test_make_dataset_rejects_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="format"):
        D.make_dataset({"format": "webdataset"})
    with pytest.raises(ValueError, match="unknown.*image_dir"):
        D.make_dataset({"format": "coco", "annotation_file": "a", "image_directory": "b", "image_dir": "c"})
    with pytest.raises(ValueError, match="missing.*data_dir"):
        D.make_dataset({"format": "cc_sbu_align"})
    with pytest.raises(ValueError, match="captions_per_image"):
        D.read_cc_sbu_align(write_cc_sbu(tmp_path), captions_per_image="some")
    with pytest.raises(ValueError, match="on_bad_image"):
        D.make_dataset({"format": "cc_sbu_align", "data_dir": str(tmp_path), "on_bad_image": "ignore"})


# ----------------------------------------------------------------------------------------------- cc_sbu_align


def write_cc_sbu(root: Path) -> Path:
    (root / "image").mkdir(parents=True, exist_ok=True)
    annotations = [
        {"image_id": "2", "caption": "The image shows a red square on a white wall."},
        {"image_id": "7", "caption": "A blue circle. "},
        {"image_id": "9", "caption": "This image file is missing."},
    ]
    for key, colour in (("2", "red"), ("7", "blue")):
        Image.new("RGB", (32, 24), colour).save(root / "image" / f"{key}.jpg")
    (root / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    return root


def test_cc_sbu_align_reader(tmp_path, caplog, tiny_processor):
    with caplog.at_level(logging.WARNING, logger="dataset"):
        ds = D.make_dataset({"format": "cc_sbu_align", "data_dir": "cc"}, base_dir=write_cc_sbu(tmp_path / "cc").parent)
    assert any("9.jpg" in r.getMessage() and " 1 " in r.getMessage() for r in caplog.records)
    assert [r.id for r in ds.records] == ["2", "7"]
    sample = ds[1]
    assert sample["conversation"][1]["content"] == "A blue circle."
    assert sample["images"][0].getpixel((5, 5))[2] > 200
    batch = D.Collator(tiny_processor)([ds[0], ds[1]])
    assert batch["pixel_values"].shape[0] == 2
    for row in range(2):
        assert image_runs(batch["input_ids"][row], tiny_processor.image_token_id) == [tiny_processor.num_image_tokens]


# ----------------------------------------------------------------------------------------------- LLaVA


def write_llava(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), "green").save(images / "sub" / "a.jpg")
    Image.new("RGB", (30, 40), "red").save(images / "b.png")
    entries = [
        {
            "id": "multi",
            "image": "sub/a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "It is green."},
                {"from": "human", "value": "Are you sure?"},
                {"from": "gpt", "value": "Yes, entirely green."},
            ],
        },
        {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
        {
            "id": "after",
            "image": "b.png",
            "conversations": [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Red."}],
        },
        {
            "id": "implicit",
            "image": "b.png",
            "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}],
        },
        {"id": "two_markers", "image": "b.png", "conversations": [{"from": "human", "value": "<image> <image>"}]},
        {
            "id": "lost",
            "image": "gone.jpg",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}],
        },
    ]
    annotation_file = root / "llava.json"
    annotation_file.write_text(json.dumps(entries))
    return annotation_file, images


def test_llava_reader_maps_roles_and_markers(tmp_path, caplog):
    annotation_file, images = write_llava(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dataset"):
        ds = D.make_dataset(
            {"format": "llava", "annotation_file": str(annotation_file), "image_directory": str(images)}
        )
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert ": 1 conversation(s)" in messages and "two_markers" in messages and "gone.jpg" in messages
    by_id = {sample["id"]: sample for sample in (ds.sample(i) for i in range(len(ds)))}
    assert list(by_id) == ["multi", "text", "after", "implicit"]
    assert by_id["multi"]["conversation"] == [
        {"role": "user", "content": f"{D.IMAGE_TOKEN} What colour is it?"},
        {"role": "assistant", "content": "It is green."},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "Yes, entirely green."},
    ]
    assert by_id["multi"]["images"] == [str(images / "sub" / "a.jpg")]
    assert by_id["text"]["images"] == [] and D.IMAGE_TOKEN not in str(by_id["text"]["conversation"])
    assert by_id["after"]["conversation"][0]["content"] == f"Describe it. {D.IMAGE_TOKEN}"
    assert by_id["implicit"]["conversation"][0]["content"] == f"{D.IMAGE_TOKEN} Colour?"


def test_text_that_is_not_unicode_and_files_that_are_not_utf8_json(tmp_path, caplog):
    annotation_file, images = write_llava(tmp_path)
    entries = json.loads(annotation_file.read_text())
    entries[1]["conversations"][1]["value"] = (
        "hi \ud83d"  # half an emoji: the JSON escape decodes, no tokenizer takes it
    )
    entries[2]["image"] = ""  # a broken file name, not a text-only sample
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(entries))  # ensure_ascii: the lone surrogate is written as its escape
    source = {"format": "llava", "annotation_file": str(broken), "image_directory": str(images)}
    with caplog.at_level(logging.WARNING, logger="dataset"):
        ds = D.make_dataset(source)
    assert [record.id for record in ds.records] == ["multi", "implicit"]
    assert "1 texts that are not valid Unicode (a lone surrogate" in caplog.text and "(e.g. id text)" in caplog.text
    assert "1 entries whose 'image' is not a file name (e.g. id after)" in caplog.text
    with pytest.raises(D.BadRecordError, match="record 'text': texts that are not valid Unicode"):
        D.make_dataset({**source, "on_bad_record": "error"})

    bom = tmp_path / "bom.json"  # as some editors save: read as it is
    bom.write_bytes(b"\xef\xbb\xbf" + annotation_file.read_bytes())
    assert len(D.make_dataset({**source, "annotation_file": str(bom)})) == 4
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(annotation_file.read_text().replace("Describe it.", "D\u00e9cris.").encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin1}: expected a LLaVA-Instruct JSON list in UTF-8, but byte"):
        D.make_dataset({**source, "annotation_file": str(latin1)})
    packed = tmp_path / "packed.json"
    packed.write_bytes(gzip.compress(annotation_file.read_bytes()))
    with pytest.raises(ValueError, match=f"{packed}: expected a LLaVA-Instruct JSON list, but it is gzip-compressed"):
        D.make_dataset({**source, "annotation_file": str(packed)})


def test_llava_mixed_batch_labels_cover_exactly_assistant_turns(tmp_path, tiny_processor):
    annotation_file, images = write_llava(tmp_path)
    ds = D.ConversationDataset(D.read_llava(annotation_file, images))
    samples = [ds[i] for i in range(len(ds))]
    batch = D.Collator(tiny_processor)(samples)
    tokenizer = tiny_processor.tokenizer
    # Only the three image samples contribute pixels, in order; the text-only one has no image span.
    assert batch["pixel_values"].shape[0] == 3
    for row, sample in enumerate(samples):
        expected_runs = [tiny_processor.num_image_tokens] * len(sample["images"])
        assert image_runs(batch["input_ids"][row], tiny_processor.image_token_id) == expected_runs
        answers = [turn["content"] + "<|end|>" for turn in sample["conversation"] if turn["role"] == "assistant"]
        decoded = [tokenizer.decode(segment) for segment in supervised_segments(batch["labels"][row])]
        assert decoded == answers


# ----------------------------------------------------------------------------------------------- odd images


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height but carries no pixel data (decoding it would be the bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def zoo(tmp_path) -> dict[str, Path]:
    files = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        files[name] = tmp_path / name
        image.save(files[name], **kwargs)

    save("grey.png", Image.new("L", (8, 6), 128))
    palette = Image.new("P", (8, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (4, 0, 8, 4))
    save("palette.png", palette, transparency=0)  # left half transparent -> white, right half red
    save("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)  # pure red in CMYK
    wide = np.zeros((4, 8), dtype=np.uint16)
    wide[:, :4], wide[:, 4:6] = 65535, 32896
    save("sixteen.png", Image.fromarray(wide))
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 2, 4))
    save("rgba.png", rgba)
    stored = Image.new("RGB", (40, 20), "red")
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored left becomes displayed top
    save("rotated.jpg", stored, exif=exif, quality=95)
    save("tiny.png", Image.new("RGB", (1, 1), (10, 200, 30)))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    files["truncated.jpg"] = tmp_path / "truncated.jpg"
    files["truncated.jpg"].write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    files["empty.jpg"] = tmp_path / "empty.jpg"
    files["empty.jpg"].write_bytes(b"")
    files["garbage.jpg"] = tmp_path / "garbage.jpg"
    files["garbage.jpg"].write_bytes(b"this is not an image" * 10)
    files["bomb.png"] = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    files["large.png"] = png_header_only(tmp_path / "large.png", 11000, 10000)  # over our limit, under PIL's
    files["missing.jpg"] = tmp_path / "missing.jpg"
    return files


BAD = ["truncated.jpg", "empty.jpg", "garbage.jpg", "bomb.png", "large.png", "missing.jpg"]


def close(pixel, expected, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, expected))


def test_decodable_odd_images_load_as_upright_rgb(zoo):
    loaded = {name: D.load_image(path) for name, path in zoo.items() if name not in BAD}
    assert all(image.mode == "RGB" for image in loaded.values())
    assert loaded["grey.png"].getpixel((3, 3)) == (128, 128, 128)
    assert loaded["palette.png"].getpixel((1, 1)) == (255, 255, 255)
    assert loaded["palette.png"].getpixel((6, 1)) == (255, 0, 0)
    assert close(loaded["cmyk.jpg"].getpixel((8, 8)), (255, 0, 0), tolerance=20)
    sixteen = loaded["sixteen.png"]
    assert sixteen.getpixel((0, 0)) == (255, 255, 255)
    assert sixteen.getpixel((4, 0)) == (128, 128, 128)
    assert sixteen.getpixel((7, 0)) == (0, 0, 0)
    assert loaded["rgba.png"].getpixel((0, 0)) == (0, 0, 255)
    assert loaded["rgba.png"].getpixel((3, 0)) == (255, 255, 255)
    rotated = loaded["rotated.jpg"]
    assert rotated.size == (20, 40)
    assert close(rotated.getpixel((10, 5)), (255, 0, 0), 30)
    assert close(rotated.getpixel((10, 35)), (0, 0, 255), 30)
    assert D.load_image(rotated).size == (20, 40)  # loading twice (dataset, then processor) must not rotate twice
    assert loaded["tiny.png"].size == (1, 1) and loaded["tiny.png"].getpixel((0, 0)) == (10, 200, 30)
    # Arrays and already-open images take the same path.
    assert D.load_image(np.full((2, 3), 7, dtype=np.uint8)).getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize("name", BAD)
def test_bad_images_raise_naming_the_file(zoo, name):
    with pytest.raises(D.BadImageError, match=name):
        D.load_image(zoo[name])


def test_bad_images_given_as_pil_images_raise_as_files_do(zoo):
    lazy = Image.open(zoo["truncated.jpg"])  # opened, not yet decoded: a notebook's Image.open(path)
    with pytest.raises(D.BadImageError, match="truncated.jpg: cannot be decoded"):
        D.load_image(lazy)
    with pytest.raises(D.BadImageError, match="image: 0x0 has no pixels"):
        D.load_image(Image.new("RGB", (0, 0)))


def test_bombs_are_rejected_from_the_header(zoo, monkeypatch):
    from PIL import ImageFile

    def no_decoding(self):
        raise AssertionError("a decompression bomb was decoded")

    # 20000x20000 RGB would take 1.2 GB to decode; the header alone must be enough to refuse it.
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for name in ("bomb.png", "large.png"):
        with pytest.raises(D.BadImageError, match="bomb"):
            D.load_image(zoo[name])


def zoo_dataset(zoo: dict[str, Path], on_bad_image: str) -> D.ConversationDataset:
    names = ["grey.png", "truncated.jpg", "empty.jpg", "tiny.png", "bomb.png", "rotated.jpg", "large.png"]
    records = [D.Record(name, (str(zoo[name]),), (f"caption {name}",)) for name in names]
    return D.ConversationDataset(records, on_bad_image=on_bad_image)


def test_skip_replaces_warns_once_per_file_and_counts(zoo, caplog):
    ds = zoo_dataset(zoo, "skip")
    with caplog.at_level(logging.WARNING, logger="dataset"):
        ids = [ds[i]["id"] for i in range(len(ds))]
        counts = [ds[i]["num_bad_images"] for i in range(len(ds))]
    # A bad sample is replaced by the next good one (wrapping around at the end).
    assert ids == ["grey.png", "tiny.png", "tiny.png", "tiny.png", "rotated.jpg", "rotated.jpg", "grey.png"]
    assert counts == [0, 2, 1, 0, 1, 0, 1]
    assert ds.bad_image_count() == 2 * sum(counts)
    warned = [r.getMessage() for r in caplog.records if "bad image" in r.getMessage()]
    assert len(warned) == 4 and all(any(name in w for w in warned) for name in BAD[:2] + BAD[3:5])


def test_error_policy_raises_naming_the_file(zoo):
    ds = zoo_dataset(zoo, "error")
    assert ds[0]["id"] == "grey.png"
    with pytest.raises(D.BadImageError, match="truncated.jpg"):
        ds[1]
    with pytest.raises(D.BadImageError, match="bomb.png"):
        ds[4]


def test_all_bad_gives_up_instead_of_looping(zoo):
    records = [D.Record(i, (str(zoo["empty.jpg"]),), ("x",)) for i in range(3)]
    with pytest.raises(D.BadImageError, match="giving up"):
        D.ConversationDataset(records)[0]


class CountingProcessor:
    """Stands in for the processor where only the collator's bookkeeping is under test."""

    def __call__(self, conversations, images, padding_side, drop_unsupervised):
        assert padding_side == "right" and drop_unsupervised
        return {"input_ids": torch.tensor([[len(i)] for i in images])}


def test_bad_image_counts_reach_the_main_process_from_workers(zoo):
    ds = zoo_dataset(zoo, "skip")
    loader = D.make_dataloader(ds, D.Collator(CountingProcessor()), batch_size=3, shuffle=False, num_workers=2)
    assert sum(int(batch["num_bad_images"]) for batch in loader) == 5
    assert ds.bad_image_count() == 0  # the loads happened in the workers


def test_a_bad_file_is_named_once_over_epochs_of_fresh_workers(zoo, tmp_path):
    # DataLoader workers are forked anew each epoch (and for each evaluation) from a process that never loaded an
    # image: each epoch named every bad file again. A log file, as the workers' records never reach caplog.
    ds = zoo_dataset(zoo, "skip")
    log = logging.FileHandler(tmp_path / "log.txt")
    logging.getLogger("dataset").addHandler(log)
    try:
        for epoch in range(3):
            ds.set_epoch(epoch)
            loader = D.make_dataloader(ds, D.Collator(CountingProcessor()), batch_size=3, num_workers=2, seed=epoch)
            assert sum(int(batch["num_bad_images"]) for batch in loader) == 5  # still counted in every epoch
    finally:
        logging.getLogger("dataset").removeHandler(log)
        log.close()
    named = [line for line in (tmp_path / "log.txt").read_text().splitlines() if "skipping bad image" in line]
    times = Counter(name for line in named for name in BAD if f"/{name}:" in line)
    assert times == dict.fromkeys(["truncated.jpg", "empty.jpg", "bomb.png", "large.png"], 1), named


def test_a_dataset_builds_and_skips_bad_files_without_shared_memory(zoo, monkeypatch, caplog):
    # The flags that name a bad file once across DataLoader workers live in shared memory; where there is none
    # (/dev/shm full or missing, the open-file limit reached) building any dataset raised torch's RuntimeError,
    # also for num_workers 0, which needs no shared memory at all.
    def no_shared_memory(tensor):
        raise RuntimeError("unable to open shared memory object </torch_1_2> in read-write mode: No space left")

    monkeypatch.setattr(torch.Tensor, "share_memory_", no_shared_memory)
    ds = zoo_dataset(zoo, "skip")
    with caplog.at_level(logging.WARNING, logger="dataset"):
        assert [ds[i]["id"] for i in range(3)] == ["grey.png", "tiny.png", "tiny.png"]
        assert [ds[i]["id"] for i in range(3)] == ["grey.png", "tiny.png", "tiny.png"]
    assert caplog.text.count("truncated.jpg") == 1 and caplog.text.count("empty.jpg") == 1
    assert ds.subset([0, 3]).records[:] == [ds.records[0], ds.records[3]]


# ----------------------------------------------------------------------------------------------- epochs


def test_instructions_vary_per_epoch_deterministically(demo_dir):
    config = {
        "format": "coco",
        "annotation_file": str(demo_dir / "captions_val.json"),
        "image_directory": str(demo_dir / "images"),
    }
    ds, again = D.make_dataset(config, seed=3), D.make_dataset(config, seed=3)

    def prompts(dataset, epoch):
        dataset.set_epoch(epoch)
        return [dataset.sample(i)["conversation"][0]["content"] for i in range(len(dataset))]

    assert prompts(ds, 0) == prompts(again, 0)
    assert prompts(ds, 0) != prompts(ds, 1)
    assert prompts(ds, 1) != prompts(D.make_dataset(config, seed=4), 1)
    assert {p.rsplit(" ", 1)[0] for p in prompts(ds, 0)} == set(D.CAPTION_INSTRUCTIONS)


def test_one_caption_per_image_varies_across_epochs():
    ds = D.ConversationDataset([D.Record(1, (), tuple(f"caption {i}" for i in range(5)))])
    answers = {ds.sample(0, epoch)["conversation"][1]["content"] for epoch in range(40)}
    assert answers == {f"caption {i}" for i in range(5)}


# ----------------------------------------------------------------------------------------------- demo set


def test_a_demo_set_says_what_made_it_so_that_a_stale_or_cut_set_is_made_again(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    assert not shapes.demo_is_current(out)
    shapes.make_demo(out)  # the default set, as --demo makes it
    assert shapes.demo_is_current(out)
    stamp = (out / shapes.DEMO_STAMP).read_text()
    (out / shapes.DEMO_STAMP).write_text(stamp.replace("sha256 ", "sha256 0"))  # made by another shapes.py
    assert not shapes.demo_is_current(out)
    shapes.make_demo(out, n=340, conversations=240)
    assert not shapes.demo_is_current(out)  # not the set --demo trains on

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shapes, "build_word_tokenizer", cut)  # stopped after the images and captions
    (out / shapes.DEMO_STAMP).write_text(stamp)
    with pytest.raises(KeyboardInterrupt):
        shapes.make_demo(out)
    assert not shapes.demo_is_current(out)


def test_make_demo_is_deterministic_and_balanced(tmp_path, demo_dir, capsys):
    shapes.main(["--out", str(tmp_path / "same"), "--n", "340", "--conversations", "240", "--seed", "0"])
    assert "chance level 1/40" in capsys.readouterr().out
    shapes.make_demo(tmp_path / "other", n=340, seed=1, conversations=240)
    for name in ("captions_train.json", "captions_val.json", "conversations_train.json", "conversations_val.json"):
        assert (demo_dir / name).read_bytes() == (tmp_path / "same" / name).read_bytes()
        assert (demo_dir / name).read_bytes() != (tmp_path / "other" / name).read_bytes()
    images = sorted(p.name for p in (demo_dir / "images").iterdir())
    assert len(images) == 340  # the conversations are about the captioned images
    assert all(
        (demo_dir / "images" / n).read_bytes() == (tmp_path / "same" / "images" / n).read_bytes() for n in images
    )

    captions = shapes.demo_captions()
    assert len(set(captions)) == 40
    for name, size in (("captions_val.json", 300), ("captions_train.json", 40)):
        data = json.loads((demo_dir / name).read_text())
        counts = Counter(a["caption"] for a in data["annotations"])
        assert len(data["images"]) == size and set(counts) == set(captions)
        assert max(counts.values()) - min(counts.values()) <= 1


def shape_colour(image_pixels: np.ndarray) -> tuple[tuple, float]:
    """A demo image's shape colour (the second most common: the background is the first) and its pixel share."""
    pixels = image_pixels.reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    second = np.argsort(counts)[-2]
    return tuple(colours[second]), counts[second] / len(pixels)


def test_demo_images_show_their_caption(demo_dir):
    data = json.loads((demo_dir / "captions_val.json").read_text())
    for image, annotation in list(zip(data["images"], data["annotations"]))[:60]:
        _, colour, shape, _, _, side = annotation["caption"].split()
        image_pixels = np.asarray(Image.open(demo_dir / "images" / image["file_name"]).convert("RGB"))
        colour_seen, share = shape_colour(image_pixels)
        assert colour_seen == shapes.DEMO_COLOURS[colour], annotation
        assert share > 0.1
        columns = np.nonzero((image_pixels == colour_seen).all(axis=-1))[1]
        assert (columns.mean() < image_pixels.shape[1] / 2) == (side == "left"), annotation


def test_each_caption_reaches_the_batch_with_its_own_image(demo_dir, tiny_processor, tmp_path):
    # The demo's pixels show their caption's colour, so a caption paired with another record's image (in the reader,
    # the dataset or the collator) is seen here, not only as a model that never learns.
    data = json.loads((demo_dir / "captions_val.json").read_text())
    data["images"].reverse()  # image ids no longer follow the list's order: pairing is by id, never by position
    (tmp_path / "captions.json").write_text(json.dumps(data))
    config = {
        "format": "coco",
        "annotation_file": str(tmp_path / "captions.json"),
        "image_directory": str(demo_dir / "images"),
        "max_samples": 24,
    }
    dataset = D.make_dataset(config, seed=3).attach(tiny_processor)
    samples = [dataset[index] for index in range(len(dataset))]
    for sample in samples:
        colour = sample["conversation"][1]["content"].split()[1]
        assert shape_colour(np.asarray(sample["images"][0]))[0] == shapes.DEMO_COLOURS[colour], sample["id"]
    batch = D.Collator(tiny_processor)(samples[:8])
    alone = [D.Collator(tiny_processor)([sample])["pixel_values"][0] for sample in samples[:8]]
    assert all(torch.equal(row, pixels) for row, pixels in zip(batch["pixel_values"], alone))  # row i: sample i


def test_demo_tokenizer_is_loadable_and_short(demo_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(demo_dir / "tokenizer"))
    assert all(t in tokenizer.get_vocab() for t in D.PHI3_SPECIAL_TOKENS)
    assert (
        max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in shapes.demo_captions()) <= 6
    )  # one token per word
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"


# ----------------------------------------------------------------------------------------------- DataLoader


def test_dataloader_workers_match_single_process(demo_dir, make_model):
    import pickle

    processor = make_model().processor
    collator = D.Collator(processor)
    pickle.dumps(collator)
    config = {
        "format": "coco",
        "annotation_file": str(demo_dir / "captions_val.json"),
        "image_directory": str(demo_dir / "images"),
        "max_samples": 48,
    }

    def batches(num_workers: int) -> list[dict]:
        ds = D.make_dataset(config, seed=5)
        ds.set_epoch(2)
        loader = D.make_dataloader(ds, collator, batch_size=8, shuffle=True, num_workers=num_workers, seed=11)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 6 and len(D.make_dataset(config)) == 48
    in_order = list(D.make_dataloader(D.make_dataset(config, seed=5), collator, batch_size=8, shuffle=False))
    assert [b["input_ids"].tolist() for b in in_order] != [b["input_ids"].tolist() for b in serial]  # shuffled
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys() and {"input_ids", "labels", "pixel_values", "num_bad_images"} <= set(a)
        assert all(torch.equal(a[key], b[key]) for key in a)


def objects_reachable_from(root: object) -> int:
    """How many objects (not classes) `root` reaches: what a forked worker that reads them writes refcounts into."""
    import gc

    seen, todo = set(), [root]
    while todo:
        item = todo.pop()
        if id(item) not in seen and not isinstance(item, type):
            seen.add(id(item))
            todo += gc.get_referents(item)
    return len(seen)


def test_records_are_packed_so_that_dataloader_workers_share_them():
    # A DataLoader worker that reads a Python object writes its reference count, which copies the page it lies on
    # into the worker (pytorch/pytorch#13246): with 665k records in a list, 4 workers added 8.5 GB within an epoch.
    records = [D.Record(i, (f"{i}.jpg",), captions=(f"caption {i}", "another")) for i in range(2000)]
    talk = D.Record("t", (), conversation=(("user", "hi"), ("assistant", "hello")))
    dataset = D.ConversationDataset([*records, talk])
    assert objects_reachable_from(dataset.records) < 10  # the same for 20 or 2 million records
    assert list(dataset.records) == [*records, talk] and dataset.records[-1] == talk
    assert dataset.sample(7)["images"] == ["7.jpg"] and dataset.subset([2000, 3]).records[:] == [talk, records[3]]


def test_packed_records_index_slice_and_join_as_a_list_does():
    records = [D.Record(i, (f"{i}.jpg",), captions=(str(i),)) for i in range(5)]
    packed = D.PackedRecords(records)
    assert len(packed) == 5 and packed[0] == records[0] and packed[-2] == records[3]
    assert packed[1:4] == records[1:4] and packed[::-2] == records[::-2]
    for index in (5, -6):
        with pytest.raises(IndexError):
            packed[index]
    joined = D.PackedRecords.join([packed, D.PackedRecords(), D.PackedRecords(records[:2])])
    assert list(joined) == records + records[:2]
    assert len(D.PackedRecords.join([])) == 0


def test_demo_conversations_round_trip_through_the_llava_reader(tmp_path, tiny_processor):
    shapes.make_demo(tmp_path, n=340, seed=0, conversations=240)
    images = tmp_path / "images"
    train = D.read_llava(tmp_path / "conversations_train.json", images)
    val = D.read_llava(tmp_path / "conversations_val.json", images)
    assert (len(train), len(val)) == (40, 200)  # every conversation kept: none is malformed
    text_only = [record for record in train if not record.images]
    assert len(text_only) == 4 and all(D.IMAGE_TOKEN not in str(record.conversation) for record in text_only)
    starts = ends = 0
    for record in train + val:
        if record.images:
            first = record.conversation[0][1]
            starts, ends = starts + first.startswith(D.IMAGE_TOKEN), ends + first.endswith(D.IMAGE_TOKEN)
            assert first.count(D.IMAGE_TOKEN) == 1 and D.IMAGE_TOKEN not in str(record.conversation[1:])
            assert Image.open(record.images[0]).size == (64, 64)
    assert starts and ends  # <image> before and after the first question both occur
    facts = {kind: answers for kind, (_, answers) in shapes.DEMO_QUESTIONS.items()}
    for record in val:  # held out: colour, shape and side, each asked once, answered with one of its answers
        asked = {
            kind
            for kind, (phrasings, _) in shapes.DEMO_QUESTIONS.items()
            for role, text in record.conversation
            if role == "user" and any(p in text for p in phrasings)
        }
        assert asked == set(facts)
        answers = [text for role, text in record.conversation if role == "assistant"]
        assert all(any(a in choices for choices in facts.values()) for a in answers)
    dataset = D.ConversationDataset(train[:12])
    samples = [dataset[i] for i in range(len(dataset))]
    batch = D.Collator(tiny_processor)(samples)
    for row, sample in enumerate(samples):
        expected = [turn["content"] + "<|end|>" for turn in sample["conversation"] if turn["role"] == "assistant"]
        decoded = [tiny_processor.tokenizer.decode(segment) for segment in supervised_segments(batch["labels"][row])]
        assert decoded == expected
