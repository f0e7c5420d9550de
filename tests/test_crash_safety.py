"""Interrupted runs: kills, signals, full or read-only disks. What is left on disk must be complete or absent, the
output directory's lock must not outlive its run, and the next run must start or resume cleanly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, random_image
from test_train import tiny_config, write

import checkpoint
import evaluate
import train
import trainer
from config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

ONE_THREAD = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}

# train.py with a signal sent to itself after a given optimizer step (deterministic: no race with a poller).
SIGNAL_AT_STEP = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
from transformers import TrainerCallback

class Signal(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.{name})

original = train.PhiClipTrainer.__init__
def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.add_callback(Signal())
train.PhiClipTrainer.__init__ = init
sys.exit(train.main(sys.argv[1:]))
"""


def run_until_signal(tmp_path: Path, config_file: Path, name: str, step: int, *argv: str):
    script = SIGNAL_AT_STEP.format(root=str(ROOT), step=step, name=name)
    return subprocess.run(
        [sys.executable, "-c", script, "--phase_one", "--config", str(config_file), *argv],
        cwd=tmp_path,
        env=ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _lock(directory: Path, **holder) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / trainer.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "started": "x", **holder}))


def test_a_lock_naming_this_process_is_refused_with_what_to_do(tmp_path):
    # A restarted container repeats hostname and pid, but two containers on the host's network do too (one of them
    # live): not taken over, but said plainly (the "in use by another run" line read as a contradiction there).
    _lock(tmp_path / "out", pid=os.getpid())
    refused = pytest.raises(ConfigError, match=r"train.lock names this very process .* a restarted container\? If no")
    with refused, trainer.output_lock(tmp_path / "out"):
        raise AssertionError("ran beside a run that may be live")
    assert json.loads((tmp_path / "out" / trainer.LOCK_FILE).read_text())["started"] == "x"  # left as it was


def test_a_lock_that_cannot_be_written_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer.json, "dump", full)
    written = pytest.raises(ConfigError, match=r"train.lock cannot be written: No space left on device$")
    with written, trainer.output_lock(tmp_path / "out"):
        raise AssertionError("ran without a lock")
    assert not (tmp_path / "out" / trainer.LOCK_FILE).exists()  # an empty one would refuse every later run
    monkeypatch.undo()
    with trainer.output_lock(tmp_path / "out"):  # space again: the next run starts
        pass


def test_a_lock_that_cannot_be_removed_does_not_hide_the_runs_error(tmp_path, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(RuntimeError, match="the run's own error"), trainer.output_lock(tmp_path / "out"):
        monkeypatch.setattr(Path, "unlink", read_only)  # the disk went read-only during the run
        raise RuntimeError("the run's own error")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_release_the_lock_and_say_where_to_resume(tmp_path, demo_dir, name):
    config = tiny_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=4, save_steps=2, eval_steps=None)
    path = write(tmp_path / "one.yaml", config)
    result = run_until_signal(tmp_path, path, name, 3)
    signum = getattr(signal, name)
    assert result.returncode == 128 + signum, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert last == (
        f"error: stopped by {name}: the latest complete checkpoint is {tmp_path / 'p1' / 'checkpoint-2'}; "
        "the same command with --resume continues"
    )
    # The lock is gone: the resumed run may start on another host (a scheduler's requeue), where a dead run's
    # lock on this host would refuse it.
    assert not (tmp_path / "p1" / trainer.LOCK_FILE).exists()
    assert [p.name for p in train.complete_checkpoints(tmp_path / "p1")] == ["checkpoint-2"]
    assert train.main(["--phase_one", "--config", str(path), "--resume"]) == 0
    assert [p.name for p in train.complete_checkpoints(tmp_path / "p1")] == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_stopped_run_is_one_line_from_the_main_process_only(tmp_path, demo_dir, monkeypatch, capsys, rank):
    # torchrun passes a scheduler's SIGTERM to every process: N copies of the same line said nothing more.
    def stopped(*args, **kwargs):
        raise trainer.Stopped

    monkeypatch.setattr(train, "run_training", stopped)
    monkeypatch.setenv("RANK", rank)
    assert train.main(["--phase_one", "--config", str(_phase_one(demo_dir, tmp_path))]) == 128 + signal.SIGTERM
    expected = "error: stopped by SIGTERM before any checkpoint was complete: the same command starts the run again\n"
    assert capsys.readouterr().err == (expected if rank == "0" else "")


def _phase_one(demo_dir: Path, tmp_path: Path) -> Path:
    config = tiny_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=4, save_steps=2, eval_steps=None)
    return write(tmp_path / "one.yaml", config)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, demo_dir, monkeypatch, capsys):
    save = torch.save

    def full_disk(obj, file, *args, **kwargs):  # what torch.save says when the disk is full
        if "checkpoint-4" in str(file):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    path, out = _phase_one(demo_dir, tmp_path), tmp_path / "p1"
    assert train.main(["--phase_one", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    assert error.startswith(f"error: {out / 'checkpoint-4'}: cannot be written ([enforce fail at inline_container")
    assert f"MB free there): the latest complete checkpoint, {out / 'checkpoint-2'}, is intact: --resume" in error
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no partial checkpoint-4, no staging, no lock
    monkeypatch.undo()
    assert train.main(["--phase_one", "--config", str(path), "--resume"]) == 0
    assert [p.name for p in train.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]


def test_a_final_model_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, demo_dir, monkeypatch, capsys):
    save_file = checkpoint.save_file

    def full_disk(tensors, file, *args, **kwargs):
        if Path(file).parent.name == ".p1.incomplete":  # the final model, staged beside the output directory
            raise OSError(28, "No space left on device")
        return save_file(tensors, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    path, out = _phase_one(demo_dir, tmp_path), tmp_path / "p1"
    assert train.main(["--phase_one", "--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {out}: cannot be written (No space left on device; ") and error.count("\n") == 1
    assert f"the latest complete checkpoint, {out / 'checkpoint-4'}, is intact" in error
    assert not (tmp_path / ".p1.incomplete").exists()  # the half-written copy does not keep the disk full
    assert not (out / "config.json").exists() and not (out / trainer.LOCK_FILE).exists()
    monkeypatch.undo()
    assert train.main(["--phase_one", "--config", str(path), "--resume"]) == 0
    assert (out / "config.json").is_file()


class Killed(BaseException):
    """A kill, in-process: nothing catches it on its way out."""


def test_a_rotation_cut_short_leaves_no_half_deleted_checkpoint_that_counts_as_complete(
    tmp_path, demo_dir, monkeypatch
):
    config = tiny_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=6, save_steps=2, save_total_limit=2, eval_steps=None)
    path, out = write(tmp_path / "one.yaml", config), tmp_path / "p1"
    rmtree = trainer.shutil.rmtree

    def killed_midway(directory, *args, **kwargs):  # rmtree's order is the directory's: the marker may come last
        if Path(directory).name == "checkpoint-2":
            (Path(directory) / "adapter.safetensors").unlink()
            raise Killed
        return rmtree(directory, *args, **kwargs)

    monkeypatch.setattr(trainer.shutil, "rmtree", killed_midway)
    with pytest.raises(Killed):  # rotating checkpoint-2 out after checkpoint-6 is complete
        train.main(["--phase_one", "--config", str(path)])
    monkeypatch.undo()
    complete = train.complete_checkpoints(out)
    assert [p.name for p in complete] == ["checkpoint-4", "checkpoint-6"]
    assert all((p / "adapter.safetensors").is_file() for p in complete)


def test_a_resume_that_only_writes_the_final_model_still_keeps_save_total_limit(tmp_path, demo_dir):
    config = tiny_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=6, save_steps=2, save_total_limit=2, eval_steps=None)
    path, out = write(tmp_path / "one.yaml", config), tmp_path / "p1"
    assert train.main(["--phase_one", "--config", str(path)]) == 0
    # As a kill leaves it between checkpoint-6's marker and the rotation: checkpoint-2 not yet removed, no final model.
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-2")
    for entry in out.iterdir():
        if not entry.name.startswith("checkpoint-"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert train.main(["--phase_one", "--config", str(path), "--resume"]) == 0
    assert [p.name for p in train.complete_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert (out / "config.json").is_file()
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]  # the run's log, not an empty one
    assert logged == json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]


def test_evaluate_killed_while_writing_leaves_no_earlier_figures_beside_new_captions(make_model, tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    random_image(1).save(tmp_path / "images" / "1.png")
    coco = {"images": [{"id": 1, "file_name": "1.png"}], "annotations": [{"id": 1, "image_id": 1, "caption": "a"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    source = {"format": "coco", "annotation_file": str(tmp_path / "captions.json")}
    source["image_directory"] = str(tmp_path / "images")
    config = {"checkpoint": {"output_dir": str(tmp_path / "unused")}, "data": {"val": source, "num_workers": 0}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    model = make_model().save_pretrained(tmp_path / "model")
    arguments = ["--checkpoint", str(model), "--config", str(tmp_path / "eval.yaml")]
    evaluate.main([*arguments, "--max_new_tokens", "1"])
    assert (model / "metrics_val.json").is_file()
    replace = evaluate.os.replace

    def killed_before_the_metrics(source, target):
        if Path(target).name == "metrics_val.json":
            raise Killed
        return replace(source, target)

    monkeypatch.setattr(evaluate.os, "replace", killed_before_the_metrics)
    with pytest.raises(Killed):
        evaluate.main([*arguments, "--max_new_tokens", "3"])
    assert (model / "captions_val.json").is_file()  # the new captions are in: the first run's figures must be gone
    assert not (model / "metrics_val.json").exists()
