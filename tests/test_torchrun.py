"""Several processes (torchrun, gloo on the CPU) train as one process with the same global batch would, resume
each other's checkpoints, and say what every process meets once."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import transformers
from conftest import ROOT
from packaging.version import Version
from safetensors.torch import load_file
from test_train import ONE_THREAD, tiny_config, write

import train
from model import PhiClipMLLM


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, demo_dir):
    # transformers 5.0 and 5.1 resume with the checkpoint's per-device batch (a change is refused there): the one
    # process then takes its 8 samples as 4 x 2 accumulation steps, so that each resume below keeps batch_size 4.
    batch, accumulation = (8, 1) if Version(transformers.__version__) >= Version("5.2") else (4, 2)

    def run(name: str, batch_size: int, launcher: list[str], accumulation: int = 1) -> tuple[list, list]:
        config = tiny_config(demo_dir, tmp_path / name)
        config["data"]["train"]["max_samples"] = 60  # not a whole number of steps of 2 x 4
        config["training_args"].update(batch_size=batch_size, max_steps=5, save_steps=5, eval_steps=5)
        config["training_args"]["gradient_accumulation_steps"] = accumulation
        config["training_args"]["eval_batch_size"] = 3  # 8 val samples: the second process's last batch is padded
        path = write(tmp_path / f"{name}.yaml", config)
        result = subprocess.run(
            [*launcher, str(ROOT / "train.py"), "--phase_one", "--config", str(path)],
            cwd=tmp_path,
            env=ONE_THREAD,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        repeats = "an epoch's last step repeats 4 sample(s) from its start to fill 2 processes"
        assert (repeats in result.stderr) == (name == "ddp"), result.stderr[-3000:]
        checkpoints = train.complete_checkpoints(tmp_path / name)
        assert [c.name for c in checkpoints] == ["checkpoint-5"]
        history = json.loads((checkpoints[0] / "trainer_state.json").read_text())["log_history"]
        return [e["loss"] for e in history if "loss" in e], [e["eval_loss"] for e in history if "eval_loss" in e]

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two, two_eval = run("ddp", 4, torchrun)
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoint-5").glob("rng_state_*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]  # each rank keeps its own RNG state for resume; everything else is written by rank 0
    PhiClipMLLM.from_pretrained(tmp_path / "ddp")
    # One process resumes the two-process run only with the same global batch (2 x 4 = 1 x 8, or 1 x 4 x 2).
    resume = ["--phase_one", "--config", str(tmp_path / "ddp.yaml"), "--resume", "--max_steps", "6"]
    assert train.main(resume) == 2
    widen = [
        "--set",
        f"training_args.batch_size={batch}",
        "--set",
        f"training_args.gradient_accumulation_steps={accumulation}",
    ]
    assert train.main([*resume, *widen]) == 0
    one, one_eval = run("single", batch, [sys.executable], accumulation)
    assert len(two) == len(one) == 5
    assert two == pytest.approx(one, rel=1e-4)
    assert len(two_eval) == len(one_eval) == 1 and two_eval == pytest.approx(
        one_eval, rel=1e-4
    )  # every val sample once
    # And the other way: two processes resume the one-process run (1 x 8 = 2 x 4) to the same step 6, and say
    # each thing once (transformers' warning that the batch size changed included).
    command = [*torchrun, str(ROOT / "train.py"), "--phase_one", "--config", str(tmp_path / "single.yaml")]
    command += ["--resume", "--max_steps", "6", "--set", "training_args.batch_size=4"]
    command += ["--set", "training_args.gradient_accumulation_steps=1"]
    ci = {**ONE_THREAD, "CI": "true"}  # where transformers also hands its warnings to the root logger (as on CI)
    result = subprocess.run(command, cwd=tmp_path, env=ci, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # without train.py's "HH:MM:SS " stamp: two processes may say the same thing in different seconds
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), result.stderr[-3000:]
    resumed_in_one = load_file(tmp_path / "ddp" / "adapter.safetensors")
    resumed_in_two = load_file(tmp_path / "single" / "adapter.safetensors")
    assert all((resumed_in_one[k] - resumed_in_two[k]).abs().max() <= 1e-6 for k in resumed_in_one)


@pytest.mark.slow
def test_torchrun_says_start_up_warnings_errors_and_the_dry_run_once(tmp_path, demo_dir):
    # Every process reads the same config and files: N identical copies of a line (one per GPU) say nothing more.
    annotations = json.loads((demo_dir / "captions_train.json").read_text())
    annotations["images"].append({"id": 10**6, "file_name": "gone.png"})
    annotations["annotations"].append({"id": 10**6, "image_id": 10**6, "caption": "a red circle"})
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    only_gone = {"images": annotations["images"][-1:], "annotations": annotations["annotations"][-1:]}
    (tmp_path / "val.json").write_text(json.dumps(only_gone))
    config = tiny_config(demo_dir, tmp_path / "out")
    config["data"]["train"]["annotation_file"] = str(tmp_path / "train.json")
    config["data"]["val"]["annotation_file"] = str(tmp_path / "val.json")  # nothing usable: an error
    path = write(tmp_path / "c.yaml", config)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        command = [*torchrun, str(ROOT / "train.py"), "--phase_one", "--config", str(path), *extra]
        return subprocess.run(command, cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True, timeout=300)

    failed = run()
    assert failed.returncode != 0
    assert failed.stderr.count("1 of 65 image file(s) missing") == 1, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(
        "val.json: no usable samples (all missing, malformed, or an empty annotation file)"
    ), failed.stderr[-3000:]
    planned = run("--dry_run")
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert planned.stdout.count("dry run:") == 1 and planned.stdout.count("trainable parameters:") == 1
