"""Artifacts written by earlier versions of this project (checkpoints, run records) or on another machine, read by
this one: used as they were meant, or refused in one line that says what to do. Each test writes what the earlier
version or the other machine wrote."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import TINY_TEXT
from safetensors.torch import load_file
from test_train import phase_two_config, tiny_config, write
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

import train
from backbones import CheckpointError
from model import PhiClipMLLM

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_checkpoint_that_records_its_tokenizer_relative_resumes(tmp_path, demo_dir, monkeypatch):
    # Before 2026-11-28 config.json kept a local tokenizer path as the YAML spelt it (tiny.yaml's data/demo/tokenizer);
    # the YAML's is now read as an absolute path, and the two were compared as strings: resume refused, saying
    # "delete the key", which an inline text model cannot do without.
    config = tiny_config(demo_dir, tmp_path / "p1", training_args={"eval_steps": None})
    path = write(tmp_path / "one.yaml", config)
    assert train.main(["--phase_one", "--config", str(path)]) == 0
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "p1" / "checkpoint-2", killed / "checkpoint-2")
    stored = json.loads((killed / "checkpoint-2" / "config.json").read_text())
    monkeypatch.chdir(tmp_path)
    stored["tokenizer"] = os.path.relpath(demo_dir / "tokenizer")  # as that version wrote it
    (killed / "checkpoint-2" / "config.json").write_text(json.dumps(stored))
    config["checkpoint"]["output_dir"] = str(killed)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "again.yaml", config)), "--resume"]) == 0
    resumed, uninterrupted = (
        load_file(killed / "adapter.safetensors"),
        load_file(tmp_path / "p1" / "adapter.safetensors"),
    )
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
    # from_pretrained takes the same tokenizer however spelt, as train.py does
    PhiClipMLLM.from_pretrained(killed / "checkpoint-2", tokenizer=str(demo_dir / "tokenizer"))


def test_a_run_moved_to_another_machine_resumes_with_its_tokenizer_where_it_now_lies(tmp_path, demo_dir, capsys):
    # config.json records a local tokenizer by its absolute path, which another machine need not have: the YAML names
    # where it lies there, and the two are the same tokenizer by content. Another tokenizer is still refused.
    config = tiny_config(demo_dir, tmp_path / "p1", training_args={"eval_steps": None})
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", config))]) == 0
    stored = json.loads((tmp_path / "p1" / "checkpoint-2" / "config.json").read_text())
    stored["tokenizer"] = "/home/someone/gone/tokenizer"  # as the first machine wrote it
    (tmp_path / "p1" / "checkpoint-2" / "config.json").write_text(json.dumps(stored))
    shutil.rmtree(tmp_path / "p1" / "checkpoint-4")

    other = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    other.add_tokens(["<|not_in_the_checkpoint|>"])
    other.save_pretrained(tmp_path / "other")
    config["model"]["tokenizer"] = str(tmp_path / "other")
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "two.yaml", config)), "--resume"]) == 2
    assert "model.tokenizer" in capsys.readouterr().err

    shutil.copytree(demo_dir / "tokenizer", tmp_path / "here" / "tokenizer")
    config["model"]["tokenizer"] = str(tmp_path / "here" / "tokenizer")
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "three.yaml", config)), "--resume"]) == 0


def test_a_moved_local_language_model_is_named_in_one_line_that_says_where_to_point_it(tmp_path, demo_dir, capsys):
    # A backbone named by a local path is not stored in the checkpoint; on another machine (or after the model was
    # moved) the recorded path is gone: loading names the file and key to change, and phase two's config too.
    values = {k: v for k, v in TINY_TEXT.items() if k != "model_type"}
    Phi3ForCausalLM(Phi3Config(**values)).save_pretrained(tmp_path / "first" / "lm")
    one = tiny_config(demo_dir, tmp_path / "p1", training_args={"eval_steps": None})
    one["model"]["text_model"] = str(tmp_path / "first" / "lm")
    one["training_args"].update(max_steps=1, save_steps=1)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", one))]) == 0
    (tmp_path / "second").mkdir()
    (tmp_path / "first" / "lm").rename(tmp_path / "second" / "lm")

    with pytest.raises(CheckpointError, match=r"config.json: text_model '.*first/lm' is not on this machine"):
        PhiClipMLLM.from_pretrained(tmp_path / "p1")
    two = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2", max_steps=1, eval_steps=None)
    two["model"] = {"text_model": str(tmp_path / "second" / "lm")}
    path = write(tmp_path / "two.yaml", two)
    assert train.main(["--config", str(path)]) == 2
    assert "is not on this machine (was the run moved?): if" in capsys.readouterr().err
    stored = json.loads((tmp_path / "p1" / "config.json").read_text())
    (tmp_path / "p1" / "config.json").write_text(json.dumps(stored | {"text_model": str(tmp_path / "second" / "lm")}))
    assert train.main(["--config", str(path)]) == 0
