"""The project run from elsewhere: another working directory, an installed copy, a notebook's process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TEXT, TINY_VISION

import shapes
import train
from training_config import ConfigError, load_config


def _config(tokenizer_dir: Path, **sections) -> dict:
    config = {
        "model": {"text_model": dict(TINY_TEXT), "vision_model": dict(TINY_VISION), "tokenizer": str(tokenizer_dir)},
        "checkpoint": {"output_dir": "checkpoints/p1"},
        "data": {"train": {"format": "coco", "annotation_file": "data/c.json", "image_directory": "data/images"}},
        "training_args": {"report_to": "none"},
    }
    config.update(sections)
    return config


def _write(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_relative_path_that_is_missing_names_where_it_was_looked_for(
    tmp_path, tiny_tokenizer_dir, capsys, monkeypatch
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    one = _write(tmp_path / "configs" / "one.yaml", _config(tiny_tokenizer_dir))
    two = _config(tiny_tokenizer_dir, peft_text={"target_modules": ["qkv_proj"]})
    two["checkpoint"] = {"output_dir": "checkpoints/p2", "load_dir": "checkpoints/p1"}
    two = _write(tmp_path / "configs" / "two.yaml", two)
    monkeypatch.chdir(elsewhere)
    for path, phase, key, relative in (
        (one, "one", "data.train.annotation_file", "data/c.json"),
        (two, "two", "checkpoint.load_dir", "checkpoints/p1"),
    ):
        with pytest.raises(ConfigError) as error:
            load_config(path, phase=phase)
        message = str(error.value)
        assert "\n" not in message and key in message and str(elsewhere / relative) in message, message
    # A dry run plans without the phase-one model, and its note says where that was looked for.
    assert train.main(["--config", str(two), "--dry_run"]) == 0
    assert f"checkpoint.load_dir 'checkpoints/p1' (from the working directory: {elsewhere / 'checkpoints/p1'})" in (
        capsys.readouterr().out
    )


def test_resume_without_a_checkpoint_names_the_directory_it_looked_in(
    tmp_path, tiny_tokenizer_dir, capsys, monkeypatch
):
    (tmp_path / "images").mkdir()
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": []}))
    config = _config(tiny_tokenizer_dir)
    config["data"]["train"].update(annotation_file=str(tmp_path / "c.json"), image_directory=str(tmp_path / "images"))
    path = _write(tmp_path / "configs" / "one.yaml", config)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    assert train.main(["--phase_one", "--config", str(path), "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path / "run" / "checkpoints" / "p1") in error, error


def test_the_demo_refuses_an_installed_copy_before_writing_anything(tmp_path, monkeypatch):
    installed, work = tmp_path / "site-packages", tmp_path / "work"
    installed.mkdir()
    work.mkdir()
    monkeypatch.setattr(train, "__file__", str(installed / "train.py"))  # `pip install .`: no training_configs/
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match="training_configs"):
        train.run_demo()
    assert Path.cwd() == work and not any(installed.iterdir()) and not any(work.iterdir())


@pytest.mark.parametrize("current", [True, False])
def test_the_demo_makes_its_set_again_unless_it_is_this_shapes_pys(monkeypatch, current):
    def stop(*args, **kwargs):
        raise ConfigError("stopped before training")

    made = []
    monkeypatch.setattr(shapes, "demo_is_current", lambda out: current)
    monkeypatch.setattr(shapes, "make_demo", lambda out, **kwargs: made.append(out))  # no data written into the clone
    monkeypatch.setattr(train, "load_config", stop)
    with pytest.raises(ConfigError, match="stopped before training"):
        train.run_demo()
    assert made == ([] if current else ["data/demo"])


def test_the_demo_gives_back_the_working_directory_and_threads_when_it_stops(tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        assert Path.cwd() == Path(train.__file__).resolve().parent  # the demo configs' paths are the clone's
        raise ConfigError("stopped here")

    monkeypatch.setattr(shapes, "make_demo", lambda *args, **kwargs: None)  # no data written into the clone
    monkeypatch.setattr(train, "load_config", stop)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ConfigError, match="stopped here"):
            train.run_demo()
        assert Path.cwd() == tmp_path and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_the_demo_scores_its_captions_without_starting_java(tmp_path, demo_dir, make_model, monkeypatch):
    # The demo reports exact match and answer accuracy, which no tokenisation changes; its evaluation started
    # PTB's and METEOR's java (~12 s, the JVM's 1.2 GB kept through phase two's training) to score nothing shown.
    java = tmp_path / "bin" / "java"
    java.parent.mkdir()
    java.write_text(f"#!/bin/sh\ntouch {tmp_path / 'java_ran'}\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{java.parent}{os.pathsep}{os.environ['PATH']}")
    val = [
        {"format": kind, "annotation_file": str(demo_dir / name), "image_directory": str(demo_dir / "images")}
        | {"max_samples": 2}
        for kind, name in (("coco", "captions_val.json"), ("llava", "conversations_val.json"))
    ]

    def config(path, overrides, phase):  # what run_demo reads of tiny.yaml and tiny_p2.yaml, on the small set
        return {"checkpoint": {"output_dir": str(tmp_path / phase)}, "data": {"val": val}, "seed": 0}

    monkeypatch.setattr(shapes, "demo_is_current", lambda out: True)
    monkeypatch.setattr(train, "load_config", config)
    monkeypatch.setattr(train, "run_training", lambda config, phase: make_model())  # a tiny untrained model
    figures = train.run_demo()
    assert figures["val images"] == 2 and "phase two caption exact match" in figures
    assert not (tmp_path / "java_ran").exists()
