"""Interrupted runs: kills, signals, full or read-only disks. What is left on disk must be complete or absent, the
output directory's lock must not outlive its run, and the next run must start or resume cleanly."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

import trainer
from config import ConfigError


def _lock(directory: Path, **holder) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / trainer.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "started": "x", **holder}))


def test_a_lock_naming_this_process_is_stale(tmp_path):
    # A container restarted with the same hostname gives the new run the dead run's pid (often 1): no one else's.
    _lock(tmp_path / "out", pid=os.getpid())
    with trainer.output_lock(tmp_path / "out"):
        assert json.loads((tmp_path / "out" / trainer.LOCK_FILE).read_text())["started"] != "x"
    assert not (tmp_path / "out" / trainer.LOCK_FILE).exists()


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
