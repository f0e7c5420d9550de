"""train.py: config validation, dry-run counts, training phases, complete-or-absent checkpoints, resume, DDP."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SHARED_DATA, TINY_TEXT, TINY_VISION
from safetensors.torch import load_file
from transformers import Phi3Config, Phi3ForCausalLM

import dry_run
import train
from generate import generate
from model import PhiClipMLLM

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ROOT / "training_configs"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_config(demo_dir: Path, out: Path, **sections) -> dict:
    """A small phase-one config on the demo set, as a dict; `sections` replace or extend its sections."""
    data = {"format": "coco", "image_directory": str(demo_dir / "images")}
    config = {
        "dtype": "float32",
        "seed": 3,
        "model": {
            "text_model": dict(TINY_TEXT),
            "vision_model": dict(TINY_VISION),
            "tokenizer": str(demo_dir / "tokenizer"),
            "adapter_dim": 48,
            "max_length": 64,
            "attn_implementation": "eager",
        },
        "checkpoint": {"output_dir": str(out)},
        "data": {
            "train": {**data, "annotation_file": str(demo_dir / "captions_train.json")},
            "val": {**data, "annotation_file": str(demo_dir / "captions_val.json"), "max_samples": 8},
            "num_workers": 0,
            "eval_captions": 2,
        },
        "training_args": {
            "max_steps": 4,
            "learning_rate": 3e-3,
            "batch_size": 8,
            "save_steps": 2,
            "save_total_limit": 2,
            "logging_steps": 1,
            "eval_steps": 4,
            "report_to": "none",
            "warmup_steps": 0,
        },
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


LORA = {
    "peft_text": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "down_proj"], "lora_dropout": 0.1},
    "peft_vision": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "fc1"], "lora_dropout": 0.1},
}


def phase_two_config(demo_dir: Path, load_dir: Path, out: Path, **training_args) -> dict:
    config = tiny_config(demo_dir, out, **LORA)
    del config["model"]
    config["checkpoint"]["load_dir"] = str(load_dir)
    config["training_args"].update(training_args)
    return config


# --------------------------------------------------------------------------------------------------- config
def test_load_config_fills_defaults_applies_overrides_and_maps_the_seed_section(tmp_path, demo_dir):
    config = tiny_config(demo_dir, tmp_path / "out")
    train_data = config["data"].pop("train")
    config["phase_one"] = {k: train_data[k] for k in ("annotation_file", "image_directory")}  # the seed's spelling
    path = write(tmp_path / "c.yaml", config)
    loaded = train.load_config(path, ["training_args.learning_rate=1e-4", "text_warmup.steps=7"], phase="one")
    assert loaded["training_args"]["learning_rate"] == 1e-4  # YAML's "1e-4" string became a float
    warmup = {"steps": 7, "learning_rate": 1e-3, "batch_size": 32, "describe": True, "data": None}
    assert loaded["text_warmup"] == warmup
    assert loaded["training_args"]["gradient_accumulation_steps"] == 1 and loaded["peft_text"] is None
    expected = {"format": "coco", **config["phase_one"], "on_bad_image": "skip", "on_bad_record": "skip"}
    assert loaded["data"]["train"] == expected
    assert loaded["path"] == str(path)
    plateau = train.load_config(path, ["training_args.lr_scheduler=reduce_lr_on_plateau"], phase="one")  # evaluates
    assert plateau["training_args"]["lr_scheduler"] == "reduce_lr_on_plateau"
    # A model section copied from a checkpoint's config.json: its record of that run is no setting, and is dropped.
    config["model"] |= {"saved_backbones": ["text_model"], "revisions": {"text_model": "a" * 40}, "lora_text": None}
    copied = train.load_config(write(tmp_path / "copied.yaml", config), phase="one")["model"]
    assert "saved_backbones" not in copied and "revisions" not in copied
    for name, phase in (("phi_clip.yaml", "one"), ("phi_clip_p2.yaml", "two"), ("tiny.yaml", "one")):
        train.load_config(CONFIGS / name, phase=phase, check_paths=False)
    assert train.load_config(CONFIGS / "tiny_p2.yaml", check_paths=False)["peft_vision"]["r"] == 16


@pytest.mark.parametrize(
    "change, phase, expected",
    [
        ({"trainig_args": {}}, "one", ["unknown key(s) trainig_args", "valid keys", "training_args"]),
        ({"training_args": {"lerning_rate": 1}}, "one", ["training_args.lerning_rate", "learning_rate"]),
        ({"model": {"adaptor_dim": 4}}, "one", ["adaptor_dim", "valid keys", "adapter_dim"]),
        ({"training_args": {"batch_size": "eight"}}, "one", ["training_args.batch_size must be int", "'eight'"]),
        ({"training_args": {"gradient_checkpointing": "yes"}}, "one", ["gradient_checkpointing must be bool"]),
        ({"model": {"adapter_dim": "big"}}, "one", ["model.adapter_dim", "'big'"]),
        ({"data": {"train": {"annotation_file": "missing.json"}}}, "one", ["data.train.annotation_file", "missing"]),
        ({"model": {"tokenizer": "./no_tokenizer"}}, "one", ["model.tokenizer", "no_tokenizer", "does not exist"]),
        ({"checkpoint": {"load_dir": "no_phase_one"}, **LORA}, "two", ["checkpoint.load_dir", "no_phase_one"]),
        ({"checkpoint": {"load_dir": "."}}, "two", ["peft_text and/or peft_vision"]),
        ({"peft_text": {"r": 4, "target_modules": ["q"], "rank": 2}}, "two", ["peft_text.rank"]),
        ({"peft_text": {"r": 4, "target_modules": ["q"], "rank_pattern": 5}}, "two", ["peft_text.rank_pattern", "5"]),
        ({"training_args": {"learning_rate": float("inf")}}, "one", ["training_args.learning_rate", "finite", "inf"]),
        (
            {"peft_text": {"r": 4, "target_modules": ["q"], "lora_dropout": 1}},
            "two",
            ["lora_dropout must be in [0, 1)"],
        ),
        ({"checkpoint": {"load_dir": "p1", "output_dir": "p1"}, **LORA}, "two", ["output_dir must differ from"]),
        ({"seed": -1}, "one", ["seed must be in [0, 2**32), got -1"]),
        ({"model": {"lora_text": {"r": 4}}}, "one", ["model.lora_text: recorded by training in a checkpoint's"]),
        ({"checkpoint": {"output_dir": ""}}, "one", ["checkpoint.output_dir is empty"]),
        ({"training_args": {"warmup_steps": -1}}, "one", ["warmup_steps must be a fraction below 1 or a whole"]),
        ({"training_args": {"lr_scheduler": "cosine_with_min_lr"}}, "one", ["needs lr_scheduler_kwargs (min_lr"]),
        ({"text_warmup": {"steps": 2, "learning_rate": -1}}, "one", ["text_warmup.learning_rate must be positive"]),
        ({"text_warmup": {"steps": -3}}, "one", ["text_warmup.steps must be 0 (off) or more, got -3"]),
        ({"training_args": {"lr_scheduler": "reduce_lr_on_plateau", "eval_steps": None}}, "one", ["steps on the eval"]),
        (
            {"peft_text": {"r": 4, "target_modules": ["q"], "rank_pattern": {"qkv": "x"}}},
            "two",
            ["peft_text.rank_pattern: 'qkv' must map to a positive integer, got 'x'"],
        ),
        (
            {"peft_text": {"r": 4, "target_modules": ["q"], "rank_pattern": {"qkv": 2.5}}},
            "two",
            ["peft_text.rank_pattern: 'qkv' must map to a positive integer, got 2.5"],
        ),
    ],
)
def test_config_errors_name_the_problem_before_any_model_is_built(
    tmp_path, demo_dir, monkeypatch, capsys, change, phase, expected
):
    class NoModel:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a model was built before the config was checked")

        from_pretrained = __init__

    monkeypatch.setattr(train, "PhiClipMLLM", NoModel)
    config = tiny_config(demo_dir, tmp_path / "out")
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            for sub, sub_value in value.items():
                merged = config[key].get(sub)
                config[key][sub] = {**merged, **sub_value} if isinstance(merged, dict) else sub_value
        else:
            config[key] = value
    path = write(tmp_path / "bad.yaml", config)
    status = train.main(["--config", str(path)] + (["--phase_one"] if phase == "one" else []))
    message = capsys.readouterr().err
    assert status == 2, message
    assert str(path) in message or "no_phase_one" in message
    for fragment in expected:
        assert fragment in message


def test_a_yaml_key_written_twice_is_an_error_not_the_last_one_wins(tmp_path, demo_dir, capsys):
    text = yaml.safe_dump(tiny_config(demo_dir, tmp_path / "out")) + "training_args:\n  learning_rate: 5\n"
    path = tmp_path / "twice.yaml"
    path.write_text(text)  # PyYAML alone would drop the first training_args section without a word
    assert train.main(["--phase_one", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "found duplicate key 'training_args'" in error and str(path) in error
    # YAML's merge key is no duplicate: a val split that repeats the train source but for its file.
    config = tiny_config(demo_dir, tmp_path / "out")
    train_file, val_file = config["data"]["train"]["annotation_file"], config["data"]["val"]["annotation_file"]
    path.write_text(
        yaml.safe_dump({k: v for k, v in config.items() if k != "data"})
        + f"data:\n  train: &train\n    format: coco\n    annotation_file: {train_file}\n"
        + f"    image_directory: {demo_dir / 'images'}\n  val:\n    <<: *train\n    annotation_file: {val_file}\n"
    )
    val = train.load_config(path)["data"]["val"]
    assert val["annotation_file"] == val_file and val["format"] == "coco"
    config = tiny_config(demo_dir, tmp_path / "out")
    config["peft_text"] = {"r": 4, "target_modules": ["q"], "lora_dropout": "5e-2"}  # YAML 1.1 reads 5e-2 as text
    assert train.load_config(write(tmp_path / "p.yaml", config))["peft_text"]["lora_dropout"] == 0.05


def test_an_output_directory_that_holds_a_model_or_cannot_be_made_is_refused(tmp_path, demo_dir, capsys, monkeypatch):
    values = {k: v for k, v in TINY_TEXT.items() if k != "model_type"}
    Phi3ForCausalLM(Phi3Config(**values)).save_pretrained(tmp_path / "lm")  # a backbone's own directory
    (tmp_path / "a_file").write_text("")
    for output_dir, expected in (
        (tmp_path / "lm", f"{tmp_path / 'lm'} already holds a model (config.json): set another"),
        (tmp_path / "a_file" / "run", f"checkpoint.output_dir '{tmp_path / 'a_file' / 'run'}' cannot be created: "),
    ):
        config = tiny_config(demo_dir, output_dir)
        config["training_args"].update(max_steps=1, eval_steps=None)
        assert train.main(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and expected in error, error
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["model_type"] == "phi3"  # untouched
    # "." is a directory like any other (the final model was staged beside a name it does not have).
    config = tiny_config(demo_dir, Path("."))
    config["training_args"].update(max_steps=1, eval_steps=None, save_steps=100)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))]) == 0
    assert (tmp_path / "here" / "config.json").is_file()


# -------------------------------------------------------------------------------------------------- dry run
def _dry_run_counts(capsys, *argv) -> dict[str, int]:
    assert train.main(["--dry_run", *argv]) == 0
    out = capsys.readouterr().out
    counts = {}
    for line in out.splitlines():
        for key in ("total parameters", "trainable parameters"):
            if line.strip().startswith(key + ":"):
                counts[key] = int(line.split(":")[1].replace(",", ""))
    assert "without gradient checkpointing" in out and "with gradient checkpointing" in out and " in 24 GB" in out
    return counts


def test_dry_run_counts_match_the_real_architectures(capsys):
    h, i, layers, vocab = 3072, 8192, 32, 32064  # Phi-3-mini-4k
    phi3 = 2 * vocab * h + layers * (h * 3 * h + h * h + h * 2 * i + i * h + 2 * h) + h
    vh, vi, vlayers = 1024, 4096, 24  # CLIP ViT-L/14 vision tower at 224 px: 16 x 16 patches + CLS
    clip = 3 * 14 * 14 * vh + vh + 257 * vh + 2 * vh + vlayers * (4 * (vh * vh + vh) + 4 * vh + 2 * vh * vi + vi + vh)
    clip += 2 * vh  # post_layernorm
    adapter = (vh * 1024 + 1024) + (1024 * h + h)
    assert abs(phi3 / 3.82e9 - 1) < 0.005 and abs(clip / 303e6 - 1) < 0.005
    counts = _dry_run_counts(capsys, "--phase_one", "--config", str(CONFIGS / "phi_clip.yaml"))
    assert counts == {"total parameters": phi3 + clip + adapter, "trainable parameters": adapter}

    r = 64  # phi_clip_p2.yaml: Phi-3 qkv_proj (h -> 3h) and o_proj; CLIP q_proj, v_proj, out_proj (vh -> vh)
    lora_text = layers * r * ((h + 3 * h) + (h + h))
    lora_vision = vlayers * r * 3 * (vh + vh)
    counts = _dry_run_counts(capsys, "--config", str(CONFIGS / "phi_clip_p2.yaml"))
    assert counts["trainable parameters"] == adapter + lora_text + lora_vision
    assert counts["total parameters"] == phi3 + clip + adapter + lora_text + lora_vision


def test_embedded_architectures_agree_with_the_published_configs():
    phi3 = SHARED_DATA / "configs" / "phi-3-mini-4k-instruct" / "config.transcribed_from_tensorrt_llm.json"
    clip = SHARED_DATA / "configs" / "clip-vit-large-patch14" / "config.json"
    if not (phi3.exists() and clip.exists()):
        pytest.skip("shared model configs not present")
    published = {"microsoft/Phi-3-mini-4k-instruct": json.loads(phi3.read_text())}
    published["openai/clip-vit-large-patch14"] = {"model_type": "clip_vision_model"}
    published["openai/clip-vit-large-patch14"].update(json.loads(clip.read_text())["vision_config"])
    for name, values in dry_run.KNOWN_ARCHITECTURES.items():
        for key, value in values.items():
            assert published[name][key] == value, (name, key)


# ------------------------------------------------------------------------------------------------- training
def test_phases_write_loadable_models_rotate_checkpoints_and_log_progress(tmp_path, demo_dir, caplog):
    caplog.set_level(logging.INFO, logger="train")
    bad = demo_dir / "images" / "bad.png"
    annotations = json.loads((demo_dir / "captions_train.json").read_text())
    annotations["images"].append({"id": 10**6, "file_name": bad.name, "width": 64, "height": 64})
    annotations["annotations"].append({"id": 10**6, "image_id": 10**6, "caption": "a red circle"})
    bad.write_bytes(b"not a png")
    train_file = tmp_path / "train.json"
    train_file.write_text(json.dumps(annotations))
    one = tiny_config(demo_dir, tmp_path / "p1", text_warmup={"steps": 2, "batch_size": 8})
    one["data"]["train"]["annotation_file"] = str(train_file)
    one["training_args"].update(max_steps=6, num_train_epochs=1)
    (tmp_path / "p1" / "checkpoint-1").mkdir(parents=True)  # an incomplete leftover of a killed run
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", one))]) == 0
    assert [p.name for p in train.complete_checkpoints(tmp_path / "p1")] == ["checkpoint-4", "checkpoint-6"]
    assert not (tmp_path / "p1" / "checkpoint-1").exists()
    log = caplog.text
    adapter = sum(p.numel() for p in PhiClipMLLM.from_pretrained(tmp_path / "p1").vision_adapter.parameters())
    assert f"phase one: training the adapter, {adapter:,} of" in log  # after the warm-up trained the LM alone
    assert "step 4 caption" in log and "bad image(s) skipped" in log
    assert any("epoch" in r.message and "1 bad image(s)" in r.message for r in caplog.records), log

    two_config = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2", max_steps=2)
    two_config["text_warmup"] = one["text_warmup"]  # as one --set serves both phases of the demo: said, not done
    two = write(tmp_path / "two.yaml", two_config)
    assert train.main(["--config", str(two)]) == 0
    assert "text_warmup runs before phase one only" in caplog.text
    model = PhiClipMLLM.from_pretrained(tmp_path / "p2")
    assert model.config.lora_text["r"] == 4 and (tmp_path / "p2" / "lora_vision").is_dir()
    assert isinstance(generate(model, "Describe this image. <|placeholder1|>", [bad.with_name("000001.png")])[0], str)
    assert train.main(["--config", str(two)]) == 2  # a fresh run refuses to mix with an earlier run's checkpoints


def test_a_text_warm_up_of_a_local_lm_is_stored_in_the_checkpoint(tmp_path, demo_dir):
    values = {k: v for k, v in TINY_TEXT.items() if k != "model_type"}
    Phi3ForCausalLM(Phi3Config(**values)).save_pretrained(tmp_path / "lm")
    one = tiny_config(demo_dir, tmp_path / "p1", text_warmup={"steps": 2, "batch_size": 8})
    one["model"]["text_model"] = str(tmp_path / "lm")
    one["training_args"].update(max_steps=1, eval_steps=None)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", one))]) == 0
    reloaded = PhiClipMLLM.from_pretrained(tmp_path / "p1").text_model.get_input_embeddings().weight
    original = Phi3ForCausalLM.from_pretrained(tmp_path / "lm").get_input_embeddings().weight
    assert not torch.equal(reloaded, original)  # the adapter was trained against the warmed-up LM: that one


def test_logged_eval_loss_is_the_loss_per_token_that_evaluate_reports_whatever_the_batch(tmp_path, demo_dir):
    from dataset import make_dataset
    from evaluate import validation_loss

    val = json.loads((demo_dir / "captions_val.json").read_text())
    images = val["images"][:8]
    words = [
        "on",
        "a",
        "wide",
        "plain",
        "under",
        "a",
        "grey",
        "sky",
        "near",
        "the",
        "old",
        "stone",
        "wall",
        "by",
        "the",
        "sea",
    ]
    captions = [  # answers from 1 to 15 words: a mean of batch means would weigh each token differently
        {"id": i, "image_id": image["id"], "caption": " ".join(["shapes", *words[: 2 * i]])}
        for i, image in enumerate(images)
    ]
    (tmp_path / "val.json").write_text(json.dumps({"images": images, "annotations": captions}))
    losses = {}
    for eval_batch_size in (3, 8):
        out = tmp_path / f"batch{eval_batch_size}"
        config = tiny_config(demo_dir, out)
        config["data"]["val"]["annotation_file"] = str(tmp_path / "val.json")
        config["training_args"].update(max_steps=1, eval_steps=1, eval_batch_size=eval_batch_size)
        trained = train.run_training(train.load_config(write(tmp_path / "c.yaml", config), phase="one"), "one")
        assert not trained.training  # returned ready to use, as from_pretrained returns a model
        state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
        losses[eval_batch_size] = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    model = PhiClipMLLM.from_pretrained(tmp_path / "batch3")  # the weights of step 1, which was evaluated
    val_set = make_dataset(config["data"]["val"], seed=config["seed"])  # the seed draws each sample's instruction
    val_set.attach(model.processor)
    expected = validation_loss(model, val_set, batch_size=5)["val_loss"]
    assert losses[3] == pytest.approx([expected], rel=1e-6) and losses[8] == pytest.approx([expected], rel=1e-6)


def test_gradient_accumulation_takes_the_step_one_batch_of_the_same_samples_takes(tmp_path, demo_dir):
    # README: the loss is normalised by the supervised tokens of the whole accumulated batch. With answers of 1 to
    # 22 words, a mean per micro-batch (or a sum of micro-batch means) would give another gradient than 8 x 1.
    train_data = json.loads((demo_dir / "captions_train.json").read_text())
    images = train_data["images"][:8]  # one step of 8 takes every sample, in whatever order
    captions = [
        {"id": i, "image_id": image["id"], "caption": " ".join(["shapes", *["on the left"] * i])}
        for i, image in enumerate(images)
    ]
    (tmp_path / "train.json").write_text(json.dumps({"images": images, "annotations": captions}))
    logged = {}
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        out = tmp_path / f"{batch_size}x{accumulation}"
        config = tiny_config(demo_dir, out)
        config["data"]["train"]["annotation_file"] = str(tmp_path / "train.json")
        config["data"]["val"] = None
        config["training_args"].update(
            max_steps=1, save_steps=1, batch_size=batch_size, gradient_accumulation_steps=accumulation
        )
        assert train.main(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))]) == 0
        state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
        (entry,) = [entry for entry in state["log_history"] if "grad_norm" in entry]
        logged[batch_size] = (entry["loss"], entry["grad_norm"])
    assert logged[4] == pytest.approx(logged[8], rel=1e-4) and logged[2] == pytest.approx(logged[8], rel=1e-4)


def test_on_bad_image_error_stops_the_run_naming_the_file(tmp_path, demo_dir, capsys):
    bad = tmp_path / "images"
    shutil.copytree(demo_dir / "images", bad)
    first = json.loads((demo_dir / "captions_train.json").read_text())["images"][0]["file_name"]
    (bad / first).write_bytes(b"")  # a zero-byte training image; 8 steps x 8 samples cover all 64
    config = tiny_config(demo_dir, tmp_path / "p1", data={"on_bad_image": "error", "num_workers": 0})
    config["data"]["train"] = {
        "format": "coco",
        "annotation_file": str(demo_dir / "captions_train.json"),
        "image_directory": str(bad),
    }
    config["training_args"].update(max_steps=8, eval_steps=None, save_steps=100)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", config))]) == 2
    assert capsys.readouterr().err == (
        f"error: {bad / first}: empty file (0 bytes) before any checkpoint was complete: once the data is fixed, "
        "the same command starts the run again\n"
    )


def test_skipped_samples_are_counted_in_tensorboard_and_the_trainer_state(tmp_path, demo_dir, caplog):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    images = tmp_path / "images"
    shutil.copytree(demo_dir / "images", images)
    train_images = json.loads((demo_dir / "captions_train.json").read_text())["images"]
    val_images = json.loads((demo_dir / "captions_val.json").read_text())["images"]
    for name in (train_images[3]["file_name"], val_images[2]["file_name"]):  # val: past the report's caption
        (images / name).write_bytes(b"not an image")
    config = tiny_config(demo_dir, tmp_path / "p1", data={"num_workers": 1, "eval_captions": 1})
    for split, size in (("train", 16), ("val", 4)):
        config["data"][split].update(image_directory=str(images), max_samples=size)
    config["training_args"].update(max_steps=4, eval_steps=2, save_steps=4, report_to="tensorboard")  # 2 epochs
    caplog.set_level(logging.INFO, logger="train")
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", config))]) == 0
    assert "phase one step 2/4: eval_loss" in caplog.text and ", eval_bad_images_skipped 1," in caplog.text
    events = event_accumulator.EventAccumulator(str(tmp_path / "p1" / "runs"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/bad_images_skipped")] == [(2, 1), (4, 1)]  # per epoch
    assert [(e.step, e.value) for e in events.Scalars("eval/bad_images_skipped")] == [(2, 1), (4, 1)]
    assert [e.step for e in events.Scalars("train/bad_records_skipped")] == [2, 4]
    assert "train/total_flos" not in events.Tags()["scalars"] and "total_flos" not in caplog.text  # always 0 here
    # The final model's trainer_state.json holds the whole run's log; the last checkpoint's stops before its end.
    history = json.loads((tmp_path / "p1" / "trainer_state.json").read_text())["log_history"]
    assert [(e["step"], e["bad_images_skipped"]) for e in history if "bad_images_skipped" in e] == [(2, 1), (4, 1)]
    assert [e["step"] for e in history if "train_loss" in e] == [4]


def _weights(directory: Path) -> dict:
    tensors = {f"adapter.{k}": v for k, v in load_file(directory / "adapter.safetensors").items()}
    for name in ("lora_text", "lora_vision"):
        tensors.update({f"{name}.{k}": v for k, v in load_file(directory / name / "adapter_model.safetensors").items()})
    return tensors


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, demo_dir):
    one = tiny_config(demo_dir, tmp_path / "p1")
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", one))]) == 0
    steps = {"max_steps": 30, "save_steps": 3, "eval_steps": 9, "save_total_limit": 3}
    whole = write(tmp_path / "whole.yaml", phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "whole", **steps))
    assert train.main(["--config", str(whole)]) == 0

    cut = write(tmp_path / "cut.yaml", phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "cut", **steps))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--config", str(cut)],
        cwd=tmp_path,
        env=ONE_THREAD,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    second = tmp_path / "cut" / "checkpoint-6" / train.COMPLETE_MARKER
    deadline = time.time() + 120
    while not second.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    (tmp_path / "cut" / "checkpoint-99").mkdir()  # as if killed while writing a later checkpoint
    assert train.complete_checkpoints(tmp_path / "cut")[-1].name != "checkpoint-99"
    assert train.main(["--config", str(cut), "--resume"]) == 0

    expected, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert expected.keys() == resumed.keys() and len(expected) > 10
    for key, tensor in expected.items():
        assert (tensor - resumed[key]).abs().max() <= 1e-6, key
