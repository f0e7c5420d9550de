"""--device and --output mistakes in generate.py, chat.py and evaluate.py: one `error:` line, exit 2, no model loaded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import random_image

import chat
import evaluate
import generate


@pytest.fixture
def inputs(tmp_path) -> dict:
    """A checkpoint that cannot load (so an error raised later than the device check shows), an image, a config."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    random_image(0).save(tmp_path / "photo.png")
    (tmp_path / "talk.json").write_text(json.dumps([{"id": 0, "conversations": [{"from": "human", "value": "Hi"}]}]))
    config = {
        "checkpoint": {"output_dir": str(tmp_path / "unused")},
        "data": {"val": {"format": "llava", "annotation_file": str(tmp_path / "talk.json")}, "num_workers": 0},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    return {
        "checkpoint": str(tmp_path / "ckpt"),
        "image": str(tmp_path / "photo.png"),
        "config": tmp_path / "eval.yaml",
    }


def arguments(command: str, inputs: dict) -> list[str]:
    argv = ["--checkpoint", inputs["checkpoint"]]
    if command == "evaluate":
        return [*argv, "--config", str(inputs["config"])]
    return [*argv, "--image", inputs["image"]]


def one_error_line(run, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        run(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


COMMANDS = {"generate": generate.main, "chat": chat.main, "evaluate": evaluate.main}


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unparseable_device_is_one_error_line(command, inputs, capsys):
    line = one_error_line(COMMANDS[command], [*arguments(command, inputs), "--device", "foo"], capsys)
    assert line == "error: --device 'foo': not a device; expected cpu, cuda or cuda:N (N: a GPU's index), or mps"


def test_a_gpu_index_the_machine_lacks_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    line = one_error_line(generate.choose_device, "cuda:2", capsys)
    assert line == "error: --device cuda:2: this machine has 2 GPU(s), numbered from cuda:0"
    assert generate.choose_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(
    "output, expected",
    [
        ("missing/results.json", "--output {tmp}/missing/results.json: no such directory '{tmp}/missing'"),
        (".", "--output {tmp}/.: is a directory; give a file name, e.g. {tmp}/results.json"),
    ],
    ids=["no such directory", "a directory"],
)
def test_evaluate_output_is_checked_before_evaluating(inputs, tmp_path, capsys, output, expected):
    argv = [*arguments("evaluate", inputs), "--output", f"{tmp_path}/{output}"]
    line = one_error_line(evaluate.main, argv, capsys)
    assert line.startswith("error: " + expected.format(tmp=tmp_path)), line


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unfinished_runs_directory_points_at_resume_or_its_last_checkpoint(command, inputs, tmp_path, capsys):
    run = tmp_path / "run"  # killed before its final model: checkpoints only
    for step in (2, 10, 12):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        if step < 12:  # 12: killed while being written
            (run / f"checkpoint-{step}" / "checkpoint_complete").write_text(f"{step}\n")
    line = one_error_line(COMMANDS[command], [*arguments(command, {**inputs, "checkpoint": str(run)})], capsys)
    assert "holds no final model, only checkpoints of an unfinished run (the last: checkpoint-10)" in line
    assert f"train.py --resume, or give {run / 'checkpoint-10'}" in line
