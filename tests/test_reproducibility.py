"""Same config and seed, same run: from the record in an output directory, and across a resume (its data order,
its loss curve in trainer_state.json and in TensorBoard); a long run's saves that depend on nothing outside."""

from __future__ import annotations

import json
import logging

import pytest
import transformers
from conftest import ROOT
from safetensors.torch import load_file
from test_train import tiny_config, write
from transformers import TrainerCallback

import train
from config import RUN_RECORD
from run_record import describe_run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_output_directory_alone_reruns_the_same_run(tmp_path, demo_dir):
    config = tiny_config(demo_dir, tmp_path / "first")
    config["phase_one"] = {k: config["data"]["train"][k] for k in ("annotation_file", "image_directory")}
    config["data"]["train"] = None  # the original's spelling of the training data: the record must still load
    config["training_args"].update(max_steps=2, save_steps=2, eval_steps=None)
    lr = ["--set", "training_args.learning_rate=1e-2"]  # the record holds what --set changed, not the file's value
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", config)), *lr]) == 0
    record = tmp_path / "first" / RUN_RECORD
    assert record.read_text() == (tmp_path / "first" / "checkpoint-2" / RUN_RECORD).read_text()
    assert f"transformers {transformers.__version__}" in record.read_text()
    rerun = ["--phase_one", "--config", str(record), "--set", f"checkpoint.output_dir={tmp_path / 'again'}"]
    assert train.main(rerun) == 0
    first, again = (load_file(tmp_path / name / "adapter.safetensors") for name in ("first", "again"))
    assert first.keys() == again.keys() and all(first[k].equal(again[k]) for k in first)
    other_seed = ["--phase_one", "--config", str(record), "--set", f"checkpoint.output_dir={tmp_path / 'seed4'}"]
    assert train.main([*other_seed, "--set", "seed=4"]) == 0
    seed4 = load_file(tmp_path / "seed4" / "adapter.safetensors")
    assert not any(first[k].equal(seed4[k]) for k in first)  # the seed initialises the adapter


def test_a_resume_with_another_seed_is_refused_and_another_training_set_warned_of(tmp_path, demo_dir, capsys, caplog):
    config = tiny_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=2, save_steps=2, eval_steps=None)
    path = write(tmp_path / "one.yaml", config)
    assert train.main(["--phase_one", "--config", str(path)]) == 0
    resume = ["--phase_one", "--config", str(path), "--resume", "--max_steps", "3"]
    capsys.readouterr()
    assert train.main([*resume, "--set", "seed=4"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --resume {tmp_path / 'p1' / 'checkpoint-2'}: that run's seed was 3") and (
        "this one's is 4" in error and len(error.splitlines()) == 1
    )
    # the other phase's checkpoint: test_real_runs.test_07
    caplog.set_level(logging.WARNING, logger="train")
    assert train.main([*resume, "--set", "data.train.max_samples=16"]) == 0  # another training set: a warning
    assert "that run's training set had 64 samples, this one has 16" in caplog.text


def test_the_record_of_a_run_resumed_twice_names_both_resume_points_and_what_each_changed(tmp_path, demo_dir):
    config = tiny_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=2, save_steps=1, eval_steps=None)
    path = str(write(tmp_path / "one.yaml", config))
    assert train.main(["--phase_one", "--config", path]) == 0
    assert train.main(["--phase_one", "--config", path, "--resume", "--max_steps", "3"]) == 0
    lr = ["--set", "training_args.learning_rate=1e-3"]
    assert train.main(["--phase_one", "--config", path, "--resume", "--max_steps", "4", *lr]) == 0
    record = (tmp_path / "p1" / RUN_RECORD).read_text()
    resumes = [line for line in record.splitlines() if line.startswith("# Resumed from")]
    assert resumes == [
        f"# Resumed from {tmp_path / 'p1' / 'checkpoint-2'} (changed: training_args.max_steps 2 -> 3).",
        f"# Resumed from {tmp_path / 'p1' / 'checkpoint-3'} (changed: training_args.max_steps 3 -> 4, "
        "training_args.learning_rate 0.003 -> 0.001).",
    ]
    assert train.load_config(tmp_path / "p1" / RUN_RECORD, phase="one")["training_args"]["learning_rate"] == 1e-3


class Stop(TrainerCallback):
    """Stops the run after step 3 is logged, one step past its checkpoint, as a kill would."""

    def on_log(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_a_resumed_run_continues_the_data_order_and_one_loss_curve(tmp_path, demo_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    runs = {}
    for name, workers in (("whole", 0), ("cut", 0)):
        config = tiny_config(demo_dir, tmp_path / name, data={"num_workers": workers})
        config["data"]["train"]["max_samples"] = 16  # two steps an epoch: the resume starts the second epoch
        config["training_args"].update(max_steps=4, save_steps=2, eval_steps=2, report_to="tensorboard")
        runs[name] = train.load_config(write(tmp_path / f"{name}.yaml", config), phase="one")
    train.run_training(runs["whole"], "one")
    with pytest.raises(KeyboardInterrupt):
        train.run_training(runs["cut"], "one", callbacks=[Stop()])
    runs["cut"]["data"]["num_workers"] = 2  # the workers draw nothing of their own: the same samples
    train.run_training(runs["cut"], "one", resume=True)

    def losses(name: str) -> list[tuple[int, float]]:
        state = json.loads((tmp_path / name / "checkpoint-4" / "trainer_state.json").read_text())
        return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]

    assert losses("cut") == losses("whole") and [step for step, _ in losses("cut")] == [1, 2, 3, 4]
    whole, cut = (load_file(tmp_path / name / "adapter.safetensors") for name in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(whole[k].equal(cut[k]) for k in whole)  # README: bitwise on the CPU
    assert "Resumed from" in (tmp_path / "cut" / RUN_RECORD).read_text()
    board = tmp_path / "cut" / "runs"
    assert all(path.is_file() for path in board.iterdir())  # one TensorBoard run per output directory
    events = event_accumulator.EventAccumulator(str(board))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    # step by step: pytest.approx compares no tuples (pytest 9.2 refuses them), and TensorBoard keeps float32
    assert [step for step, _ in logged] == [step for step, _ in losses("whole")]
    assert [value for _, value in logged] == pytest.approx([value for _, value in losses("whole")])
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]


def test_logging_after_training_hides_none_of_the_runs_steps(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainer import ResumableTensorBoard

    args, state, control = TrainingArguments(str(tmp_path), report_to="none"), TrainerState(), TrainerControl()
    board, state.global_step = ResumableTensorBoard(), 2  # resumed from checkpoint-2
    board.on_train_begin(args, state, control)
    for state.global_step in (3, 4):
        board.on_log(args, state, control, logs={"loss": float(state.global_step)})
    board.on_train_end(args, state, control)
    board.on_log(args, state, control, logs={"eval_loss": 1.0})  # trainer.evaluate() after training: a new writer
    events = event_accumulator.EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [3, 4]


def test_a_saved_lora_holds_lora_only_and_asks_no_hub_for_the_base_config(make_model, tmp_path, monkeypatch):
    import peft.utils.save_and_load

    def no_network(repo_id: str, filename: str, **kwargs):
        raise AssertionError(f"a Hub lookup of {repo_id}/{filename} at each checkpoint")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_network)
    model = make_model().setup_lora(
        {"r": 2, "target_modules": ["qkv_proj", "lm_head"]}, {"r": 2, "target_modules": ["q_proj"]}
    )
    for backbone in (
        model.text_model,
        model.vision_model,
    ):  # as loaded by hub name, e.g. microsoft/Phi-3-mini-4k-instruct
        backbone.peft_config["default"].base_model_name_or_path = "example/a-hub-model"
    model.save_pretrained(tmp_path / "model")
    saved = load_file(tmp_path / "model" / "lora_text" / "adapter_model.safetensors")
    assert saved and all("lora_" in key for key in saved)  # not the frozen lm_head, as peft's "auto" stored it


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "training_configs").glob("*.yaml")))
def test_every_shipped_configs_record_reads_back_as_the_same_config(tmp_path, name):
    phase = "two" if "_p2" in name else "one"
    config = train.load_config(ROOT / "training_configs" / name, phase=phase, check_paths=False)
    (tmp_path / "record.yaml").write_text(describe_run(config, phase))
    again = train.load_config(tmp_path / "record.yaml", phase=phase, check_paths=False)
    dropped = ("path", "phase_one", "phase_two")  # the original's data sections are in data.train by now
    assert {k: v for k, v in again.items() if k not in dropped} == {k: v for k, v in config.items() if k not in dropped}


def test_a_hand_edited_record_does_not_stop_a_resume_from_being_recorded(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / RUN_RECORD).write_text("# python 3.11.7, torch\nseed: 1\n")  # a version cut off by hand
    record = describe_run({"path": "c.yaml", "seed": 1}, "one", checkpoint)
    assert f"# Resumed from {checkpoint} (changed: torch  -> " in record
