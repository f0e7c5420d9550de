"""What stops or silently damages a real run (issue 9): odd records and images, text-only batches, paths, locks,
resume, phase chaining, config semantics, checkpoint errors, revisions, and the original project's API and files.

Each test is named for the numbered item it covers (`test_09_...` for item 9).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TEXT, TINY_VISION, random_image
from PIL import Image
from safetensors.torch import load_file
from test_train import LORA, phase_two_config, write
from test_train import tiny_config as run_config

import dataset as D
import train
import trainer
from backbones import CheckpointError
from config import ConfigError, checkpoint_problem
from model import PhiClipMLLM
from processor import BadImageError, load_image
from training_config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_THREAD = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def phase_one_dir(demo_dir, tmp_path_factory) -> Path:
    """A trained (4 steps) tiny phase-one checkpoint, shared by the tests that start from one."""
    out = tmp_path_factory.mktemp("p1") / "p1"
    config = run_config(demo_dir, out)
    assert train.main(["--phase_one", "--config", str(write(out.parent / "one.yaml", config))]) == 0
    return out


def llava_file(root: Path, entries: list) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "green").save(root / "images" / "a.png")
    path = root / "llava.json"
    path.write_text(json.dumps(entries))
    return path


def turn(who: str, text) -> dict:
    return {"from": who, "value": text}


GOOD = [turn("human", "<image>\nWhat colour?"), turn("gpt", "green")]


# ------------------------------------------------------------------------------------------------ 1. tensorboard
def test_01_tensorboard_logs_curves_and_captions_in_both_phases(tmp_path, demo_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    one = run_config(demo_dir, tmp_path / "p1")
    one["training_args"].update(report_to="tensorboard", max_steps=2, eval_steps=2, save_steps=2)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", one))]) == 0
    two = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2", max_steps=2, eval_steps=2, save_steps=2)
    two["training_args"]["report_to"] = "tensorboard"
    assert train.main(["--config", str(write(tmp_path / "two.yaml", two))]) == 0
    for out in ("p1", "p2"):
        (events,) = {path.parent for path in (tmp_path / out).rglob("events.out.tfevents.*")}
        board = EventAccumulator(str(events))
        board.Reload()
        scalars = set(board.Tags()["scalars"])
        assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= scalars, scalars
        assert "eval/captions/text_summary" in board.Tags()["tensors"], board.Tags()
        assert json.loads((tmp_path / out / "config.json").read_text())["text_model"]["model_type"] == "phi3"


# --------------------------------------------------------------------------------------------------- 2. records
def test_02_malformed_llava_records_are_excluded_and_named(tmp_path, caplog):
    entries = [
        {"id": "ok", "image": "a.png", "conversations": GOOD},
        {"id": "text_only", "conversations": [turn("human", "Say hi."), turn("gpt", "hi")]},
        {"id": "gpt_first", "image": "a.png", "conversations": [turn("gpt", "Hello!"), *GOOD]},
        {
            "id": "gpt_twice",
            "conversations": [turn("gpt", "Hello!"), turn("gpt", "Hi!"), turn("human", "Hi?"), turn("gpt", "hi")],
        },
        {"id": "human_only", "image": "a.png", "conversations": [turn("human", "<image>\nAnyone?")]},
        {"id": "empty", "conversations": []},
        {"id": "gpt_only", "conversations": [turn("gpt", "I talk alone")]},
        {"id": "no_conversations", "image": "a.png"},
        {"id": "null_value", "conversations": [turn("human", None), turn("gpt", "x")]},
        {"id": "image_not_a_name", "image": 7, "conversations": GOOD},
        "not an object",
        {"id": 12, "conversations": [turn("human", "int id"), turn("gpt", "fine")]},
        {"id": "system", "conversations": [turn("system", "Be brief."), turn("human", "Hi"), turn("gpt", "Hi")]},
        {"id": "hf_keys", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]},
        {"id": "markup", "conversations": [turn("human", "What does it say?"), turn("gpt", "It says <|end|> here")]},
        {"id": "bos", "conversations": [turn("human", "Strike <s>this</s>?"), turn("gpt", "No")]},
    ]
    path = llava_file(tmp_path, entries)
    with caplog.at_level(logging.WARNING, logger="dataset"):
        records = D.read_llava(path, tmp_path / "images")
    assert [r.id for r in records] == ["ok", "text_only", "gpt_first", "gpt_twice", 12]
    assert records[2].conversation[0] == ("user", "<|placeholder1|> What colour?")  # the gpt opener is dropped
    assert records[3].conversation[0][0] == "user"  # however many
    log = caplog.text
    assert f"{path}: 11 conversation(s) excluded" in log
    for reason, record_id in [
        ("without a gpt turn", "human_only"),
        ("empty conversations (no turns)", "empty"),
        ("gpt turns only", "gpt_only"),
        ("without a 'conversations' list", "no_conversations"),
        ("a turn whose value is NoneType, not text", "null_value"),
        ("a turn from 'system' (expected human or gpt)", "system"),
        ("not {'from', 'value'} (found ['content', 'role'])", "hf_keys"),
        ("a control token such as <|end|>", "markup"),
        ("a control token such as <|end|>", "bos"),
        ("'image' is not a file name", "image_not_a_name"),
        ("not JSON objects", "10"),
    ]:
        assert reason in log and record_id in log, (reason, log)
    assert "2 conversation(s) began with a gpt turn" in log and "gpt_first" in log
    with pytest.raises(D.BadRecordError, match=r"llava\.json: record 'human_only': conversations without a gpt"):
        D.read_llava(path, tmp_path / "images", on_bad_record="error")


def test_02_odd_coco_annotations_are_excluded_and_named(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    for name in ("1.png", "2.png", "3.png", "4.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "images" / name)
    coco = {
        "images": [
            {"id": 1, "file_name": "1.png"},
            {"id": "2", "file_name": "2.png"},  # a string id; its captions name it as an int
            {"id": 3, "file_name": "3.png"},
            {"id": 3, "file_name": "4.png"},  # duplicate id: whose captions are they?
            {"file_name": "no_id.png"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": " a red square "},
            {"id": 11, "image_id": 2, "caption": "another red square"},
            {"id": 12, "image_id": 1, "caption": None},
            {"id": 13, "image_id": 1, "caption": "   "},
            {"id": 14, "image_id": 3, "caption": "ambiguous"},
            {"id": 15, "image_id": 99, "caption": "orphan"},
            {"id": "16", "image_id": 1, "caption": "a square"},
            {"id": 17, "image_id": 1, "caption": "a sign reading <|user|>"},
            {"id": 5, "image_id": 1, "caption": "first by id"},  # captions come in annotation-id order
        ],
    }
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING, logger="dataset"):
        records = D.read_coco(path, tmp_path / "images", "all")
    assert [(r.id, r.captions) for r in records] == [
        (1, ("first by id",)),
        (1, ("a red square",)),
        (1, ("a square",)),
        ("2", ("another red square",)),
    ]
    log = caplog.text
    for fragment in (
        "image ids listed more than once (e.g. id 3)",
        "not in 'images' (e.g. id 15)",
        "non-empty caption",
        "control token such as <|end|> (the tokenizer would read it as markup) (e.g. id 17)",
    ):
        assert fragment in log, log
    assert "images[4]" in log and "annotations[2]" in log and "annotations[3]" in log
    with pytest.raises(D.BadRecordError, match=r"captions\.json: record 'images\[4\]'"):
        D.read_coco(path, tmp_path / "images", on_bad_record="error")


def test_02_samples_too_long_for_max_length_are_replaced_and_counted(tmp_path, make_model, caplog):
    model = make_model(max_length=40)  # 16 image tokens per image
    long_question = "<image>\n" + "please " * 60 + "what colour?"
    entries = [
        {"id": "cut_into_image", "image": "a.png", "conversations": [turn("human", "a " * 40 + "<image>"), GOOD[1]]},
        {"id": "answer_cut_away", "image": "a.png", "conversations": [turn("human", long_question), GOOD[1]]},
        {"id": "fine", "image": "a.png", "conversations": GOOD},
    ]
    path = llava_file(tmp_path, entries)
    dataset = D.make_dataset(
        {"format": "llava", "annotation_file": str(path), "image_directory": str(tmp_path / "images")}
    )
    dataset.attach(model.processor)
    with caplog.at_level(logging.WARNING, logger="dataset"):
        samples = [dataset[i] for i in range(3)]
    assert [s["id"] for s in samples] == ["fine"] * 3
    assert [s["num_bad_records"] for s in samples] == [2, 1, 0]
    assert "record 'cut_into_image'" in caplog.text and "cut into the image" in caplog.text
    assert "record 'answer_cut_away'" in caplog.text and str(path) in caplog.text
    assert caplog.text.count("record 'cut_into_image'") == 1  # named once
    batch = D.Collator(model.processor)(samples[:1])  # batch size 1: always a usable sample
    assert int(batch["num_bad_records"]) == 2 and (batch["labels"] != -100).any()
    strict = D.make_dataset(
        {
            "format": "llava",
            "annotation_file": str(path),
            "image_directory": str(tmp_path / "images"),
            "on_bad_record": "error",
        }
    ).attach(model.processor)
    with pytest.raises(D.BadRecordError, match=r"llava\.json: record 'cut_into_image': sample is \d+ tokens long"):
        strict[0]


def test_02_a_run_on_odd_llava_data_trains_and_reports_per_epoch(tmp_path, demo_dir, caplog):
    images = demo_dir / "images"
    ok = [turn("human", "<image>\nWhat colour?"), turn("gpt", "red")]
    entries = [{"id": f"ok{i}", "image": "000001.png", "conversations": ok} for i in range(6)]
    entries += [
        {
            "id": "too_long",
            "image": "000002.png",
            "conversations": [turn("human", "x " * 80 + "<image>"), turn("gpt", "y")],
        },
        {"id": "human_only", "conversations": [turn("human", "hello?")]},
        {"id": "words", "conversations": [turn("human", "Say hi."), turn("gpt", "hi")]},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    config = run_config(demo_dir, tmp_path / "p1")
    config["data"]["train"] = {
        "format": "llava",
        "annotation_file": str(tmp_path / "llava.json"),
        "image_directory": str(images),
    }
    config["training_args"].update(batch_size=1, max_steps=8, save_steps=100, eval_steps=None)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="dataset")
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", config))]) == 0
    assert "human_only" in caplog.text and "record 'too_long'" in caplog.text
    epoch_lines = [r.getMessage() for r in caplog.records if "bad record(s) skipped" in r.getMessage()]
    assert epoch_lines and all("0 bad record(s)" not in line for line in epoch_lines), epoch_lines
    strict = dict(config, data=dict(config["data"], on_bad_record="error"))
    strict["checkpoint"] = {"output_dir": str(tmp_path / "strict")}
    caplog.clear()
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "strict.yaml", strict))]) == 2


# ------------------------------------------------------------------------------------------------ 3. text only
def test_03_text_only_batches_train_in_both_phases(make_model):
    model = make_model().train()
    batch = model.processor(["Say hi.", "Tell me more."], None, ["hi", "more"])
    assert "pixel_values" not in batch
    for phase in ("one", "two"):
        if phase == "one":
            model.prime_model("one")
        else:
            model.setup_lora(LORA["peft_text"], LORA["peft_vision"])
        model.zero_grad()
        model(**batch).loss.backward()
        adapter_grads = [p.grad for p in model.vision_adapter.parameters()]
        assert all(g is not None and not g.any() for g in adapter_grads)  # in the graph, exactly zero
        if phase == "two":
            text_lora = [p.grad for n, p in model.text_model.named_parameters() if "lora_B" in n]
            assert text_lora and all(g is not None and g.abs().sum() > 0 for g in text_lora)


DDP_SCRIPT = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch, torch.distributed as dist
from conftest import random_image, tiny_config
from model import PhiClipMLLM
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = PhiClipMLLM(tiny_config({tokenizer!r})).train()
model.setup_lora({text_lora!r}, {vision_lora!r})
ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
for step in range(2):
    if rank == 0:  # text only: no image anywhere in this rank's batch
        batch = model.processor(["Say hi."], None, ["hi"])
    else:
        batch = model.processor(["Describe this image. <|placeholder1|>"], [random_image(step)], ["a red circle"])
    optimizer.zero_grad()
    ddp(**batch).loss.backward()
    optimizer.step()
vector = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
gathered = [torch.zeros_like(vector) for _ in range(2)]
dist.all_gather(gathered, vector)
assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
print(f"rank {{rank}} ok {{float(vector.abs().sum())}}", flush=True)  # one write: the ranks share stdout
dist.barrier()
dist.destroy_process_group()
# Twice in CI (never alone) a rank aborted in C++ teardown at exit ("terminate called without an active exception");
# what this test checks is done and said above, so the process leaves without running the interpreter's teardown.
os._exit(0)
"""


@pytest.mark.slow
def test_03_ddp_trains_when_one_rank_has_no_image(tmp_path, tiny_tokenizer_dir):
    script = tmp_path / "ddp.py"
    script.write_text(
        DDP_SCRIPT.format(
            root=str(ROOT),
            tests=str(ROOT / "tests"),
            tokenizer=str(tiny_tokenizer_dir),
            text_lora=LORA["peft_text"],
            vision_lora=LORA["peft_vision"],
        )
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"stdout: {result.stdout[-500:]}\nstderr: {result.stderr[-3000:]}"
    assert result.stdout.count(" ok ") == 2


# ---------------------------------------------------------------------------------------------- 4. aspect ratio
def test_04_elongated_images_are_refused_before_the_resize(tmp_path, make_model):
    for width in (5000, 20000):
        Image.new("RGB", (width, 1), "red").save(tmp_path / f"{width}.png")
    for width in (5000, 20000):
        assert load_image(tmp_path / f"{width}.png").size == (width, 1)  # no resize planned: fine
        with pytest.raises(BadImageError, match=rf"{width}x1 is too elongated"):
            load_image(tmp_path / f"{width}.png", short_side=224)
    model = make_model()
    with pytest.raises(BadImageError, match="too elongated"):
        model.processor("Describe this image. <|placeholder1|>", [tmp_path / "20000.png"])  # generate()'s path
    records = [
        D.Record(i, (str(tmp_path / name),), ("a red line",)) for i, name in enumerate(["20000.png", "5000.png"])
    ]
    records.append(D.Record(2, (str(tmp_path / "ok.png"),), ("a square",)))
    random_image(0).save(tmp_path / "ok.png")
    dataset = D.ConversationDataset(records).attach(model.processor)  # 56 px: 5000x1 scales to 15.7 M pixels
    assert (dataset[0]["id"], dataset[0]["num_bad_images"]) == (1, 1)
    assert (dataset[1]["id"], dataset[1]["num_bad_images"]) == (1, 0)


# ------------------------------------------------------------------------------------------------------ 5. paths
def test_05_tilde_and_variables_expand_in_every_path_and_checkpoints_load_anywhere(tmp_path, demo_dir, monkeypatch):
    home, work, elsewhere = tmp_path / "home", tmp_path / "work", tmp_path / "elsewhere"
    for directory in (home, work, elsewhere):
        directory.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DEMO", str(demo_dir))
    (work / "tok").symlink_to(demo_dir / "tokenizer", target_is_directory=True)
    config = run_config(demo_dir, "~/p1")
    config["model"]["tokenizer"] = "tok"  # relative to the working directory
    for split in ("train", "val"):
        config["data"][split]["image_directory"] = "$DEMO/images"
    config["training_args"].update(max_steps=2, save_steps=2, eval_steps=None)
    monkeypatch.chdir(work)
    loaded = load_config(write(work / "one.yaml", config), phase="one")
    assert loaded["checkpoint"]["output_dir"] == str(home / "p1")
    assert loaded["data"]["train"]["image_directory"] == str(demo_dir / "images")
    assert loaded["model"]["tokenizer"] == str((work / "tok").resolve())
    assert train.main(["--phase_one", "--config", "one.yaml"]) == 0
    assert (home / "p1" / "config.json").is_file() and not (work / "~").exists()
    assert [p.name for p in train.complete_checkpoints(home / "p1")] == ["checkpoint-2"]
    stored = json.loads((home / "p1" / "config.json").read_text())
    assert stored["tokenizer"] == str((work / "tok").resolve())
    monkeypatch.chdir(elsewhere)
    PhiClipMLLM.from_pretrained("~/p1")


# ------------------------------------------------------------------------------------------------------- 6. lock
def test_06_a_second_run_in_the_same_output_dir_refuses_at_once(tmp_path, demo_dir, capsys):
    config = run_config(demo_dir, tmp_path / "p1")
    path = write(tmp_path / "one.yaml", config)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "p1").mkdir()
        lock = {"pid": other.pid, "host": os.uname().nodename, "started": "now"}
        (tmp_path / "p1" / trainer.LOCK_FILE).write_text(json.dumps(lock))
        assert train.main(["--phase_one", "--config", str(path)]) == 2
        message = capsys.readouterr().err
        assert f"is in use by another run (pid {other.pid}" in message and trainer.LOCK_FILE in message
        assert not (tmp_path / "p1" / "config.json").exists()
    finally:
        other.kill()
        other.wait()
    assert train.main(["--phase_one", "--config", str(path)]) == 0  # the holder is gone: its lock is taken over
    assert not (tmp_path / "p1" / trainer.LOCK_FILE).exists()  # released at the end


# ------------------------------------------------------------------------------------------------------ 7. resume
def test_07_resume_after_a_kill_in_the_final_save_does_not_train_past_max_steps(tmp_path, demo_dir):
    config = run_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=4, save_steps=2, eval_steps=None)
    path = write(tmp_path / "one.yaml", config)
    assert train.main(["--phase_one", "--config", str(path)]) == 0
    adapter = load_file(tmp_path / "p1" / "checkpoint-4" / "adapter.safetensors")
    (tmp_path / "p1" / "config.json").unlink()  # as if killed while publishing the final model
    assert train.main(["--phase_one", "--config", str(path), "--resume"]) == 0
    assert [p.name for p in train.complete_checkpoints(tmp_path / "p1")] == ["checkpoint-2", "checkpoint-4"]
    final = load_file(tmp_path / "p1" / "adapter.safetensors")
    assert all(torch.equal(final[k], v) for k, v in adapter.items())


def test_07_resume_refuses_a_checkpoint_of_the_other_phase(tmp_path, demo_dir, phase_one_dir, capsys):
    checkpoint = train.complete_checkpoints(phase_one_dir)[-1]
    two = phase_two_config(demo_dir, phase_one_dir, tmp_path / "p2")
    status = train.main(["--config", str(write(tmp_path / "two.yaml", two)), "--resume", str(checkpoint)])
    assert status == 2
    error = capsys.readouterr().err  # refused before any weight loads, by what the checkpoint's record says
    assert f"--resume {checkpoint}: that checkpoint is of a phase-one run" in error and "this run is phase two" in error
    assert len(error.splitlines()) == 1


# ---------------------------------------------------------------------------------------------- 8. model section
def test_08_phase_two_reads_its_model_section(tmp_path, demo_dir, phase_one_dir, capsys, caplog):
    caplog.set_level(logging.INFO, logger="train")
    two = phase_two_config(demo_dir, phase_one_dir, tmp_path / "p2", max_steps=1, eval_steps=None)
    two["model"] = {"max_length": 96, "attn_implementation": "sdpa", "adapter_dim": 48, "vision_feature_layer": -1}
    assert train.main(["--config", str(write(tmp_path / "two.yaml", two))]) == 0
    stored = json.loads((tmp_path / "p2" / "config.json").read_text())
    assert stored["max_length"] == 96 and stored["attn_implementation"] == "sdpa"
    assert "max_length=96" in caplog.text  # the effective settings are logged
    two["model"] = {"adapter_dim": 32}
    two["checkpoint"]["output_dir"] = str(tmp_path / "p2b")
    assert train.main(["--config", str(write(tmp_path / "two_b.yaml", two))]) == 2
    message = capsys.readouterr().err
    assert "model.adapter_dim is 32 in the config but 48 in" in message and str(phase_one_dir) in message


# --------------------------------------------------------------------------------------------------- 9. chaining
def _lora(directory: Path) -> dict:
    return load_file(directory / "lora_text" / "adapter_model.safetensors")


def test_09_phase_two_continues_or_merges_a_loaded_lora(tmp_path, demo_dir, phase_one_dir, capsys):
    two = phase_two_config(demo_dir, phase_one_dir, tmp_path / "p2", max_steps=2, eval_steps=None)
    assert train.main(["--config", str(write(tmp_path / "two.yaml", two))]) == 0
    again = phase_two_config(demo_dir, tmp_path / "p2", tmp_path / "p3", max_steps=2, eval_steps=None)
    assert train.main(["--config", str(write(tmp_path / "three.yaml", again))]) == 0
    before, after = _lora(tmp_path / "p2"), _lora(tmp_path / "p3")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)

    fresh = {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"], "lora_dropout": 0.0}
    different = dict(again, peft_text=fresh)
    different["checkpoint"] = {"load_dir": str(tmp_path / "p2"), "output_dir": str(tmp_path / "p4")}
    assert train.main(["--config", str(write(tmp_path / "four.yaml", different))]) == 2
    assert "loaded_lora: merge" in capsys.readouterr().err
    different["checkpoint"]["loaded_lora"] = "merge"
    assert train.main(["--config", str(write(tmp_path / "four.yaml", different))]) == 0
    merged = PhiClipMLLM.from_pretrained(tmp_path / "p4")
    assert merged.config.lora_text["r"] == 2 and "text_model" in merged.config.saved_backbones
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in _lora(tmp_path / "p4")} == {"o_proj"}


def test_09_what_peft_trains_besides_lora_trains_on_after_resume_and_in_a_continuation(
    tmp_path, demo_dir, phase_one_dir, caplog, capsys
):
    caplog.set_level(logging.INFO, logger="train")
    shutil.copytree(phase_one_dir, tmp_path / "p1")
    two = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2", max_steps=2, save_steps=1, eval_steps=None)
    two["peft_vision"] = dict(two["peft_vision"], bias="all")  # biases train too: their names hold no "lora_"
    two["peft_text"] = dict(two["peft_text"], modules_to_save=["lm_head"])  # a trained copy of the output layer
    path = write(tmp_path / "two.yaml", two)
    assert train.main(["--config", str(path)]) == 0
    shutil.rmtree(tmp_path / "p1")  # phase one's model gone (or left on another machine): a resume needs only its own
    assert train.main(["--config", str(path), "--resume", "--max_steps", "3"]) == 0
    again = phase_two_config(demo_dir, tmp_path / "p2", tmp_path / "p3", max_steps=1, eval_steps=None)
    again.update(peft_text=two["peft_text"], peft_vision=two["peft_vision"])
    assert train.main(["--config", str(write(tmp_path / "three.yaml", again))]) == 0
    counts = re.findall(r"training the adapter and LoRA, ([\d,]+) of", caplog.text)
    assert len(counts) == 3 and len(set(counts)) == 1, counts  # fresh, resumed and continued: the same weights
    reloaded = PhiClipMLLM.from_pretrained(tmp_path / "p3")  # the trained output layer is the one that computes
    stored = load_file(tmp_path / "p3" / "lora_text" / "adapter_model.safetensors")
    head = [v for k, v in stored.items() if "lm_head" in k]
    assert len(head) == 1 and torch.equal(reloaded.text_model.get_output_embeddings().weight, head[0])

    ignored = dict(again, peft_vision=None)  # a loaded LoRA that the config does not mention: no silent choice
    ignored["checkpoint"] = {"load_dir": str(tmp_path / "p2"), "output_dir": str(tmp_path / "p4")}
    assert train.main(["--config", str(write(tmp_path / "four.yaml", ignored))]) == 2
    assert "peft_vision: the loaded model already has LoRA" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 10. epochs, launchers
RECORDING_SCRIPT = """
import json, os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import train
from dataset import Collator


class Recording(Collator):
    def __call__(self, samples):
        with open(os.path.join({out!r}, "seen_" + os.environ.get("RANK", "0") + ".jsonl"), "a") as handle:
            for sample in samples:
                handle.write(json.dumps([sample["id"], sample["conversation"][0]["content"]]) + "\\n")
        return super().__call__(samples)


train.Collator = Recording
sys.exit(train.main(["--phase_one", "--config", {config!r}]))
"""


@pytest.mark.slow
def test_10_each_epoch_draws_new_instructions_under_two_processes(tmp_path, demo_dir):
    config = run_config(demo_dir, tmp_path / "p1")
    config["data"]["train"]["max_samples"] = 8
    config["training_args"].update(max_steps=-1, num_train_epochs=2, batch_size=2, save_steps=100, eval_steps=None)
    script = tmp_path / "record.py"
    path = write(tmp_path / "one.yaml", config)
    script.write_text(
        RECORDING_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path), config=str(path))
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = D.make_dataset(load_config(path)["data"]["train"], seed=config["seed"])
    index = {record.id: i for i, record in enumerate(dataset.records)}
    changed = 0
    for rank in (0, 1):
        seen = [json.loads(line) for line in (tmp_path / f"seen_{rank}.jsonl").read_text().splitlines()]
        assert len(seen) == 8  # 2 epochs x 2 steps x 2 samples on each rank
        for position, (record_id, prompt) in enumerate(seen):
            epoch = position // 4
            assert prompt == dataset.sample(index[record_id], epoch=epoch)["conversation"][0]["content"]
            changed += prompt != dataset.sample(index[record_id], epoch=0)["conversation"][0]["content"]
    assert changed > 0  # the second epoch's draws are not the first's


@pytest.mark.slow
def test_10_accelerate_launch_runs_train_py(tmp_path, demo_dir):
    pytest.importorskip("accelerate")
    config = run_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=2, save_steps=2, eval_steps=None)
    path = write(tmp_path / "one.yaml", config)
    # On a CPU-only machine `--num_processes 2` starts a single process (several need MPI): README says so.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    command += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train.py"),
        "--phase_one",
        "--config",
        str(path),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in train.complete_checkpoints(tmp_path / "p1")] == ["checkpoint-2"]
    PhiClipMLLM.from_pretrained(tmp_path / "p1")


# ------------------------------------------------------------------------------------- 11. wrong data, silently
@pytest.mark.parametrize(
    "change, argv, expected",
    [
        (
            {"data": {"train": {"max_samples": -5}}},
            [],
            "max_samples must be a positive integer (or null for all), got -5",
        ),
        ({"training_args": {"num_train_epochs": 0, "max_steps": -1}}, [], "num_train_epochs must be positive, got 0"),
        ({}, ["--max_steps", "0"], "training_args.max_steps must be positive (or -1: train num_train_epochs), got 0"),
        ({"training_args": {"eval_steps": 0}}, [], "training_args.eval_steps must be positive, or null"),
        ({"training_args": {"warmup_steps": 2.5}}, [], "warmup_steps must be a fraction below 1 or a whole number"),
        ({"training_args": {"report_to": "tensorbored"}}, [], "report_to: unknown integration(s) ['tensorbored']"),
        ({"data": {"num_workers": -1}}, [], "data.num_workers must be 0 or more, got -1"),
        ({"model": {"vision_feature_layer": -5}}, [], "vision_feature_layer=-5 is outside the vision model's 3 layers"),
        ({"model": {"attn_implementation": "flash"}}, [], "model.attn_implementation: expected one of"),
        ({"model": {"max_length": 600}}, [], "model.max_length=600 is longer than the text model's 512 positions"),
        ({"model": {"tokenizer": None}}, [], "model.tokenizer is required with an inline text_model"),
        ({"peft_text": {"r": 0, "target_modules": ["qkv_proj"]}}, [], "peft_text.r must be a positive integer, got 0"),
        ({"peft_vision": {"target_modules": [3]}}, [], "peft_vision.target_modules must be a list of module names"),
        ({"checkpoint": {"loaded_lora": "keep"}}, [], "checkpoint.loaded_lora must be one of ('continue', 'merge')"),
    ],
)
def test_11_wrong_values_are_one_line_errors_before_anything_loads(tmp_path, demo_dir, capsys, change, argv, expected):
    config = run_config(demo_dir, tmp_path / "p1")
    for key, value in change.items():
        for sub, sub_value in value.items():
            current = config.setdefault(key, {}).get(sub)
            config[key][sub] = {**current, **sub_value} if isinstance(current, dict) else sub_value
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config)), *argv]) == 2
    message = capsys.readouterr().err
    assert expected in message and len(message.strip().splitlines()) == 1, message
    assert str(tmp_path / "c.yaml") in message  # the file the bad value is in, wherever the check runs
    assert not (tmp_path / "p1").exists()  # nothing was written


def test_11_report_to_takes_the_integrations_of_the_installed_transformers(tmp_path, demo_dir):
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from training_config import load_config

    config = run_config(demo_dir, tmp_path / "p1")
    path = write(tmp_path / "c.yaml", config)
    # kubeflow came after transformers 5.0: accepted where this transformers has it, refused before the run where not
    if "kubeflow" in INTEGRATION_TO_CALLBACK:
        assert (
            load_config(path, ["training_args.report_to=kubeflow"], "one")["training_args"]["report_to"] == "kubeflow"
        )
    else:
        with pytest.raises(ConfigError, match=r"unknown integration\(s\) \['kubeflow'\]"):
            load_config(path, ["training_args.report_to=kubeflow"], "one")
    with pytest.raises(ConfigError, match=r"unknown integration\(s\) \['tensorbored'\]; expected some of \['auto'"):
        load_config(path, ["training_args.report_to=[tensorboard, tensorbored]"], "one")


def test_11_load_dir_names_a_checkpoint_or_a_file_inside_one_never_its_parent(tmp_path, demo_dir, phase_one_dir):
    from training_config import load_config

    def load_dir(value: Path) -> str:
        config = phase_two_config(demo_dir, value, tmp_path / "p2")
        return load_config(write(tmp_path / "c.yaml", config), phase="two")["checkpoint"]["load_dir"]

    assert load_dir(phase_one_dir / "model_checkpoint.pt") == str(phase_one_dir)  # the original named its .pt
    # A step the run never saved is an error, not the run's final model in its place.
    with pytest.raises(ConfigError, match="checkpoint-999': no such directory"):
        load_dir(phase_one_dir / "checkpoint-999")


# -------------------------------------------------------------------------------------------- 12. LoRA targets
@pytest.mark.parametrize(
    "backbone, targets, count, extra",
    [
        ("text", "all-linear", 2 * 4, {}),
        ("text", "all-linear", 2 * 4 - 1, {"exclude_modules": ["model.layers.0.self_attn.o_proj"]}),
        ("text", r".*\.self_attn\.(qkv|o)_proj", 2 * 2, {}),
        ("vision", r".*\.fc\d", 3 * 2, {}),
        # peft's other spellings: a dotted suffix, and a name list narrowed by exclude_modules / layers_to_transform
        ("vision", ["self_attn.q_proj", "mlp.fc1"], 3 * 2, {}),
        ("text", ["qkv_proj", "o_proj"], 3, {"exclude_modules": ["model.layers.0.self_attn.o_proj"]}),
        ("vision", ["q_proj", "v_proj"], 2, {"layers_to_transform": [0]}),
    ],
)
def test_12_lora_accepts_all_linear_and_regex_targets(make_model, caplog, backbone, targets, count, extra):
    model = make_model()
    settings = {"r": 2, "target_modules": targets, **extra}
    with caplog.at_level(logging.INFO, logger="model"):
        model.setup_lora(**{f"{backbone}_lora": settings})
    adapted = {
        n.split(".lora_A")[0] for n, _ in getattr(model, f"{backbone}_model").named_parameters() if ".lora_A" in n
    }
    assert len(adapted) == count and f"LoRA on the {backbone} model: {count} layers" in caplog.text
    assert not any("lm_head" in name for name in adapted)
    with pytest.raises(ValueError, match="matches no linear layer"):
        make_model().setup_lora(text_lora={"r": 2, "target_modules": r"nothing\..*"})
    with pytest.raises(ValueError, match=r"\['mlp.q_proj'\] match no linear layer"):  # a suffix must end a name
        make_model().setup_lora(vision_lora={"r": 2, "target_modules": ["self_attn.q_proj", "mlp.q_proj"]})


def test_12_a_target_that_exclusions_empty_is_named_as_excluded(make_model):
    # q_proj exists: "match no linear layer; available: [..., 'q_proj', ...]" would contradict itself
    settings = {"r": 2, "target_modules": ["q_proj", "v_proj"], "exclude_modules": r".*\.q_proj"}
    with pytest.raises(
        ValueError, match=r"^peft_vision.target_modules: \['q_proj'\] match only layers left out by exclude_modules$"
    ):
        make_model().setup_lora(vision_lora=settings)


# ------------------------------------------------------------------------------------------- 13. evaluate split
def test_13_evaluate_checks_only_the_split_it_evaluates(tmp_path, demo_dir, phase_one_dir, capsys):
    import evaluate

    config = run_config(demo_dir, tmp_path / "unused")
    config["data"]["train"]["image_directory"] = str(tmp_path / "no_train2017")
    config["data"]["val"]["max_samples"] = 4
    path = write(tmp_path / "eval.yaml", config)
    evaluate.main(
        ["--checkpoint", str(phase_one_dir), "--config", str(path), "--batch_size", "4", "--max_new_tokens", "3"]
    )
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 4 and metrics["val_tokens"] > 0
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--checkpoint", str(phase_one_dir), "--config", str(path), "--split", "train"])
    assert stopped.value.code == 2 and "no_train2017" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- 14. checkpoint errors
@pytest.mark.parametrize(
    "damage",
    [
        "truncated_adapter",
        "bad_config_json",
        "no_tokenizer",
        "adapter_shape",
        "bad_lora",
        "truncated_backbone",
        "bad_config_value",
    ],
)
def test_14_a_broken_checkpoint_file_is_named(tmp_path, make_model, damage):
    model = make_model()
    model.setup_lora(text_lora={"r": 2, "target_modules": ["qkv_proj"]})
    checkpoint = model.save_pretrained(tmp_path / "ckpt")
    if damage == "truncated_adapter":
        broken = checkpoint / "adapter.safetensors"
        broken.write_bytes(broken.read_bytes()[:100])
        expected = "adapter.safetensors: cannot be read as safetensors"
    elif damage == "bad_config_json":
        broken = checkpoint / "config.json"
        broken.write_text('{"text_model": ')
        expected = "config.json: not a readable PhiClipMLLM config.json"
    elif damage == "no_tokenizer":
        (checkpoint / "tokenizer.json").unlink()
        broken, expected = checkpoint, "the tokenizer files are missing"
    elif damage == "adapter_shape":
        broken = checkpoint / "config.json"
        broken.write_text(broken.read_text().replace('"adapter_dim": 48', '"adapter_dim": 40'))
        expected = "adapter.safetensors: holds tensors"
    elif damage == "bad_config_value":
        broken = checkpoint / "config.json"
        broken.write_text(broken.read_text().replace('"normalize": true', '"normalize": "yes"'))
        expected = "config.json: model.normalize"
    elif damage == "truncated_backbone":  # random backbones are stored with the checkpoint
        broken = checkpoint / "text_model" / "model.safetensors"
        broken.write_bytes(broken.read_bytes()[:1000])
        expected = "the checkpoint's stored text_model cannot be loaded"
    else:
        broken = checkpoint / "lora_text" / "adapter_model.safetensors"
        broken.write_bytes(b"\0" * 20)
        expected = "lora_text: the LoRA adapter cannot be loaded"
    with pytest.raises(CheckpointError, match=expected) as raised:
        PhiClipMLLM.from_pretrained(checkpoint)
    assert str(broken) in str(raised.value) or str(broken.parent) in str(raised.value)
    if damage != "truncated_adapter":
        return  # the command line's part is the same for every damage: checked once
    random_image(0).save(tmp_path / "photo.png")
    command = [
        sys.executable,
        str(ROOT / "generate.py"),
        "--checkpoint",
        str(checkpoint),
        "--image",
        str(tmp_path / "photo.png"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ONE_THREAD)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- 15. revisions
REVISION_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import TINY_VISION, tiny_config
from model import PhiClipMLLM
if sys.argv[1] == "save":
    model = PhiClipMLLM(tiny_config({tokenizer!r}, vision_model="someone/tiny-clip"))
    print(model.config.revisions["vision_model"])
    model.save_pretrained({checkpoint!r})
else:
    PhiClipMLLM.from_pretrained({checkpoint!r})
"""


def _hub_snapshot(cache: Path, repo: str, revision: str, source: Path) -> None:
    """Lay out a model the way the hub cache stores it, so `repo` loads offline at `revision`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "snapshots" / revision).mkdir(parents=True)
    for file in source.iterdir():
        (root / "snapshots" / revision / file.name).write_bytes(file.read_bytes())
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)


def test_15_hub_revisions_are_recorded_and_a_different_one_warns(tmp_path, tiny_tokenizer_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    for seed in (0, 1):
        torch.manual_seed(seed)
        CLIPVisionModel(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / f"tower{seed}")
    cache, first, second = tmp_path / "hub", "a" * 40, "b" * 40
    _hub_snapshot(cache, "someone/tiny-clip", first, tmp_path / "tower0")
    script = tmp_path / "revision.py"
    script.write_text(
        REVISION_SCRIPT.format(
            root=str(ROOT),
            tests=str(ROOT / "tests"),
            tokenizer=str(tiny_tokenizer_dir),
            checkpoint=str(tmp_path / "ckpt"),
        )
    )
    env = ONE_THREAD | {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    saved = subprocess.run([sys.executable, str(script), "save"], env=env, capture_output=True, text=True, timeout=120)
    assert saved.returncode == 0 and saved.stdout.strip() == first, saved.stderr[-2000:]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["revisions"] == {"vision_model": first}
    same = subprocess.run([sys.executable, str(script), "load"], env=env, capture_output=True, text=True, timeout=120)
    assert same.returncode == 0 and "revision" not in same.stderr, same.stderr[-2000:]
    _hub_snapshot(cache, "someone/tiny-clip", second, tmp_path / "tower1")  # the hub's files were replaced
    moved = subprocess.run([sys.executable, str(script), "load"], env=env, capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert f"is now revision {second[:12]}, but this checkpoint was trained on revision {first[:12]}" in moved.stderr


# ------------------------------------------------------------------------------------------ 16. the original's
def test_16_the_original_api_and_config_files_work(tmp_path, demo_dir, phase_one_dir, capsys):
    from model import generate

    model = PhiClipMLLM.from_pretrained(phase_one_dir / "model_checkpoint.pt", dtype=torch.float32)
    assert checkpoint_problem(phase_one_dir / "model_checkpoint.pt") is None  # generate.py etc. take it as well
    assert checkpoint_problem(tmp_path / "nowhere" / "model_checkpoint.pt") == "no such directory"
    assert isinstance(
        generate(model, ["Describe this image <|placeholder1|> "], images=[demo_dir / "images" / "000001.png"])[0], str
    )
    cc = tmp_path / "phase_two_data"
    (cc / "image").mkdir(parents=True)
    annotations = []
    for i in range(4):
        random_image(i).save(cc / "image" / f"{i}.jpg")
        annotations.append({"image_id": str(i), "caption": "a picture of noise"})
    (cc / "filter_cap.json").write_text(json.dumps({"annotations": annotations}))
    original = {  # the original project's spelling of a phase-two file
        "model": {"text_model": dict(TINY_TEXT), "vision_model": dict(TINY_VISION), "adapter_dim": 48},
        "dtype": "torch.float32",
        "checkpoint": {"output_dir": str(tmp_path / "p2"), "load_dir": str(phase_one_dir / "model_checkpoint.pt")},
        "phase_one": {"annotation_file": "not/used/in/phase/two.json", "image_directory": "not/used"},
        "phase_two": {"directory": str(cc)},
        "training_args": {"num_train_epochs": 1, "learning_rate": 0.001, "batch_size": 2, "save_steps": 5000},
        **{k: v for k, v in LORA.items()},
    }
    loaded = load_config(write(tmp_path / "p2.yaml", original), phase="two")
    assert loaded["dtype"] == "float32" and loaded["checkpoint"]["load_dir"] == str(phase_one_dir)
    assert loaded["data"]["train"]["format"] == "cc_sbu_align"
    assert train.main(["--config", str(tmp_path / "p2.yaml")]) == 0
    assert PhiClipMLLM.from_pretrained(tmp_path / "p2").config.lora_vision["r"] == 4
    original["peft_adapter"] = {"r": 12, "target_modules": ["0", "2"]}
    with pytest.raises(ConfigError, match="peft_adapter: the adapter trains in full in phase two"):
        load_config(write(tmp_path / "p2_adapter.yaml", original), phase="two")
