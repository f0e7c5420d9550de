"""What a user's mistakes and odd data get: one `error:` line naming the problem, or the bad part skipped; nothing
a user owns is deleted, and a run continues where asked. (Found by trying the commands as a user would.)"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys

import pytest
import torch
import transformers
from conftest import SHARED_DATA, require_shared
from packaging.version import Version
from test_train import phase_two_config, tiny_config, write
from transformers import AutoTokenizer

import dataset as D
import train
from config import ConfigError
from generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = train.main(argv)
    except SystemExit as exit:  # argparse's errors exit from inside main
        status = exit.code
    return status, capsys.readouterr().err


def one_line_error(status: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------ demo
def test_demo_never_deletes_a_directory_the_user_names(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    status, err = run(["--demo", "--set", f"checkpoint.output_dir={precious}"], capsys)
    assert "does not take 'checkpoint.output_dir=" in one_line_error(status, err)
    with pytest.raises(ConfigError, match="not a training output"):
        train._remove_demo_output(precious)
    assert (precious / "notes.txt").read_text() == "mine"
    for leftover in ("empty", "run"):  # an earlier demo's output (or an empty directory) is replaced
        (tmp_path / leftover).mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    for leftover in ("empty", "run"):
        train._remove_demo_output(tmp_path / leftover)
        assert not (tmp_path / leftover).exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--demo", "--config", "training_configs/tiny.yaml"], "--demo takes no --config"),
        (["--demo", "--dry_run"], "--demo takes no --dry_run"),
        (["--demo", "--phase_one", "--resume"], "--demo takes no --phase_one, --resume"),
        (["--config", "training_configs/tiny.yaml", "--gpu_memory_gb", "12"], "--gpu_memory_gb only sizes a --dry_run"),
        (["--config", "training_configs/tiny.yaml", "--dry_run", "--resume"], "--dry_run plans the configured run"),
        (
            ["--phase_one", "--config", "training_configs/tiny_p2.yaml"],
            "peft_text and peft_vision and checkpoint.load_dir: phase two's",
        ),
    ],
)
def test_flags_that_would_be_ignored_are_refused(argv, expected, capsys):
    """The demo deletes and retrains its outputs: flags it would silently ignore (a dry run!) stop it first."""
    status, err = run(argv, capsys)
    assert expected in one_line_error(status, err)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_the_demo_under_a_launcher_is_refused_once(local_rank, monkeypatch, capsys):
    # Under torchrun each process deleted the output directory that another had just locked: one died with a
    # misleading "holds files that are not a training output" and the other hung.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    status, err = run(["--demo"], capsys)
    if local_rank == "0":
        assert "--demo runs in one process" in one_line_error(status, err)
    else:
        assert (status, err) == (2, "")  # the first process on the machine says it


def test_a_later_process_on_the_machine_says_only_the_errors_that_may_be_its_own(
    tmp_path, demo_dir, monkeypatch, capsys
):
    # Under torchrun the first process on a machine reports what every process meets alike (a missing data file);
    # an error from building the model, which may depend on the process's GPU, each process reports itself.
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = tiny_config(demo_dir, tmp_path / "out")
    config["data"]["train"]["annotation_file"] = str(tmp_path / "gone.json")
    assert run(["--phase_one", "--config", str(write(tmp_path / "gone.yaml", config))], capsys) == (2, "")
    config = tiny_config(demo_dir, tmp_path / "out", model={"max_length": 1000})
    status, err = run(["--phase_one", "--config", str(write(tmp_path / "long.yaml", config))], capsys)
    assert "model.max_length=1000 is longer than the text model's 512 positions" in one_line_error(status, err)


# -------------------------------------------------------------------------------------------------- training
def test_a_bad_image_among_the_report_captions_is_skipped_not_fatal(tmp_path, demo_dir, caplog):
    caplog.set_level(logging.INFO, logger="train")
    val = json.loads((demo_dir / "captions_val.json").read_text())
    first = val["images"][0]["file_name"]
    (tmp_path / "images").mkdir()
    for image in val["images"][:8]:
        shutil.copy(demo_dir / "images" / image["file_name"], tmp_path / "images")
    (tmp_path / "images" / first).write_bytes(b"not an image")
    config = tiny_config(demo_dir, tmp_path / "out")
    config["data"]["val"] = {"format": "coco", "annotation_file": str(demo_dir / "captions_val.json")}
    config["data"]["val"].update(image_directory=str(tmp_path / "images"), max_samples=8)
    config["training_args"].update(max_steps=1, eval_steps=1)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))]) == 0
    assert "skipping bad image" in caplog.text and first in caplog.text
    assert "step 1 caption" in caplog.text  # the report went on with the next usable images


def test_the_report_captions_a_conversation_whose_image_comes_in_a_later_question(tmp_path, demo_dir, caplog):
    caplog.set_level(logging.INFO, logger="train")
    image = json.loads((demo_dir / "captions_val.json").read_text())["images"][0]["file_name"]
    turns = [("human", "hello"), ("gpt", "hi"), ("human", "<image>\nwhat is this?"), ("gpt", "a shape")]
    late = {"id": "late", "image": image, "conversations": [{"from": f, "value": v} for f, v in turns]}
    (tmp_path / "late.json").write_text(json.dumps([late]))
    config = tiny_config(demo_dir, tmp_path / "out")
    config["data"]["val"] = {"format": "llava", "annotation_file": str(tmp_path / "late.json")}
    config["data"]["val"]["image_directory"] = str(demo_dir / "images")
    config["training_args"].update(max_steps=1, eval_steps=1)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))]) == 0
    assert "step 1 caption late:" in caplog.text and "(reference 'hi')" in caplog.text  # the first turn, no image


def test_a_finished_run_is_named_and_resume_trains_it_further(tmp_path, demo_dir, capsys, caplog):
    caplog.set_level(logging.INFO, logger="train")
    config = tiny_config(demo_dir, tmp_path / "p1")
    config["training_args"].update(max_steps=2, save_steps=2, eval_steps=None)
    path = str(write(tmp_path / "one.yaml", config))
    assert train.main(["--phase_one", "--config", path]) == 0
    status, err = run(["--phase_one", "--config", path], capsys)
    assert "holds a finished run (checkpoint-2 is its last step)" in one_line_error(status, err)
    (tmp_path / "p1" / "metrics_val.json").write_text('{"val_loss": 5.6}')  # evaluate.py's, of the step-2 model
    # --resume given the output directory itself takes its latest complete checkpoint
    assert train.main(["--phase_one", "--config", path, "--resume", str(tmp_path / "p1"), "--max_steps", "4"]) == 0
    assert [p.name for p in train.complete_checkpoints(tmp_path / "p1")] == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "p1" / "metrics_val.json").exists()  # export's model card would quote it
    state = json.loads((tmp_path / "p1" / "checkpoint-4" / "trainer_state.json").read_text())
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    assert rates[3] > 0  # the first step past the old end trains at the new schedule's rate, not the old end's 0
    # Going back to step 2 would delete the new run's checkpoints as written (rotation keeps the highest steps).
    status, err = run(["--phase_one", "--config", path, "--resume", str(tmp_path / "p1" / "checkpoint-2")], capsys)
    assert "also holds later checkpoints (checkpoint-4); move them aside" in one_line_error(status, err)
    # Another global batch would not continue the data position and schedule; the same one by other means does.
    more = ["--phase_one", "--config", path, "--resume", "--max_steps", "5", "--set", "training_args.batch_size=4"]
    status, err = run(more, capsys)
    assert "global batch was 8 (1 x 8 x 1), this one's is 4 (1 x 4 x 1)" in one_line_error(status, err)
    # A learning rate or weight decay changed for the rest of the run is taken, not the checkpoint's.
    changed = ["training_args.gradient_accumulation_steps=2", "training_args.learning_rate=0.01"]
    if Version(transformers.__version__) < Version("5.2"):  # 5.0/5.1 would keep the checkpoint's batch_size: refused
        status, err = run([*more, "--set", changed[0]], capsys)
        assert "resumes with the checkpoint's batch_size (8), not this config's (4)" in one_line_error(status, err)
        more, changed = more[:-2], changed[1:]  # the same batch as the checkpoint's, for the rest of the test
    status, err = run([*more, *(x for c in [*changed, "training_args.weight_decay=0.1"] for x in ("--set", c))], capsys)
    assert status == 0, err
    expected = "resuming with learning_rate 0.01 and weight_decay 0.1 as configured (the checkpoint's: 0.003 and 0)"
    assert expected in caplog.text
    assert [p.name for p in train.complete_checkpoints(tmp_path / "p1")] == ["checkpoint-4", "checkpoint-5"]
    groups = torch.load(tmp_path / "p1" / "checkpoint-5" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [(0.01, 0.1), (0.01, 0.0)]  # biases: no decay
    state = json.loads((tmp_path / "p1" / "checkpoint-5" / "trainer_state.json").read_text())
    rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry}
    assert rates[5] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))  # cosine over 5 steps, at step 4

    # Phase two on it: the loaded model keeps its tokenizer and architecture, and says so in the user's terms.
    other = tmp_path / "other_tokenizer"  # another vocabulary (a copy of the same one agrees: test_old_artifacts)
    changed = AutoTokenizer.from_pretrained(demo_dir / "tokenizer")
    changed.add_tokens(["<|another_token|>"])
    changed.save_pretrained(other)
    for model_section, expected in (
        ({"tokenizer": str(other)}, f"model.tokenizer is {str(other)!r} in the config but"),
        ({"vision_feature_layer": -2}, "model.vision_feature_layer is -2 in the config but -1 in"),
        ({"max_length": 1000}, "model.max_length=1000 is longer than the text model's 512 positions"),
    ):
        two = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2", max_steps=1)
        two["model"] = model_section
        status, err = run(["--config", str(write(tmp_path / "two.yaml", two))], capsys)
        assert expected in one_line_error(status, err) and str(tmp_path / "two.yaml") in err


@pytest.mark.parametrize(
    "backbone, change, expected",
    [
        ("text_model", {"hidden_size": "abc"}, "model.text_model: not a valid 'phi3' config"),
        ("vision_model", {"model_type": "clip"}, "model.vision_model.model_type is 'clip'; expected clip_vision_model"),
        ("text_model", {"num_attention_heads": 3}, "hidden_size 64 is not a multiple of num_attention_heads 3"),
        ("text_model", {"vocab_size": 100}, "model.text_model.vocab_size=100 is smaller than the tokenizer"),
    ],
)
def test_bad_inline_backbone_configs_are_one_line_errors(tmp_path, demo_dir, capsys, backbone, change, expected):
    config = tiny_config(demo_dir, tmp_path / "out")
    config["model"][backbone].update(change)
    status, err = run(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))], capsys)
    assert f"{tmp_path / 'c.yaml'}: model." in one_line_error(status, err) and expected in err  # the file too


@pytest.mark.parametrize(
    "backbone, right, wrong",
    [("text_model", "hidden_size", "hiden_size"), ("vision_model", "image_size", "image_sise")],
)
def test_a_misspelt_inline_backbone_key_is_an_error_not_the_default_size(
    tmp_path, demo_dir, capsys, backbone, right, wrong
):
    config = tiny_config(demo_dir, tmp_path / "out")
    config["model"][backbone][wrong] = config["model"][backbone].pop(right)
    status, err = run(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))], capsys)
    assert f"model.{backbone}.{wrong}: not a" in one_line_error(status, err)
    assert f"did you mean {right}?" in err


def test_real_backbone_configs_pasted_inline_are_accepted():
    """Keys older or newer transformers know (rope_theta, CLIP's generation defaults) are not typos."""
    from backbones import inline_config

    configs = require_shared(SHARED_DATA / "configs")
    text = json.loads((configs / "phi-3-mini-4k-instruct/config.transcribed_from_tensorrt_llm.json").read_text())
    vision = json.loads((configs / "clip-vit-large-patch14/config.json").read_text())["vision_config"]
    assert inline_config("text_model", {**text, "model_type": "phi3"}).hidden_size == 3072
    assert inline_config("vision_model", {**vision, "model_type": "clip_vision_model"}).hidden_size == 1024


def test_data_errors_met_during_training_are_one_line_errors(tmp_path, demo_dir, capsys):
    annotations = json.loads((demo_dir / "captions_train.json").read_text())
    bad = annotations["images"][0]["file_name"]
    (tmp_path / "images").mkdir()
    for image in annotations["images"]:
        shutil.copy(demo_dir / "images" / image["file_name"], tmp_path / "images")
    (tmp_path / "images" / bad).write_bytes(b"not an image")
    config = tiny_config(demo_dir, tmp_path / "out")
    config["data"]["train"]["image_directory"] = str(tmp_path / "images")
    config["data"].update(on_bad_image="error", num_workers=1, val=None)  # raised in a DataLoader worker
    status, err = run(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))], capsys)
    assert f"{bad}: cannot be decoded as an image" in one_line_error(status, err)

    config = tiny_config(demo_dir, tmp_path / "out2")
    config["model"]["max_length"] = 12  # shorter than every sample (16 image tokens alone)
    config["data"]["val"] = None
    status, err = run(["--phase_one", "--config", str(write(tmp_path / "c2.yaml", config))], capsys)
    line = one_line_error(status, err)
    assert "consecutive samples are unusable (0 bad image(s), 51 bad record(s); the last:" in line
    assert "max_length" in line


def test_a_run_stopped_by_bad_data_names_the_checkpoint_to_resume(tmp_path, demo_dir, capsys):
    # A run hours in that meets a bad image (on_bad_image: error) ends as a Ctrl-C ends it: where to go on from.
    annotations = json.loads((demo_dir / "captions_train.json").read_text())
    (tmp_path / "images").mkdir()
    for image in annotations["images"]:
        shutil.copy(demo_dir / "images" / image["file_name"], tmp_path / "images")
    config = tiny_config(demo_dir, tmp_path / "out")
    config["data"]["train"].update(image_directory=str(tmp_path / "images"), max_samples=16)
    config["data"].update(on_bad_image="error", val=None)
    config["training_args"].update(batch_size=4, max_steps=2, save_steps=2)
    path = str(write(tmp_path / "c.yaml", config))
    status, err = run(["--phase_one", "--config", path], capsys)
    assert status == 0, err
    bad = annotations["images"][0]["file_name"]
    (tmp_path / "images" / bad).write_bytes(b"not an image")  # e.g. a network disk's file gone bad meanwhile
    status, err = run(["--phase_one", "--config", path, "--resume", "--max_steps", "8"], capsys)  # two epochs
    latest = train.complete_checkpoints(tmp_path / "out")[-1]
    assert one_line_error(status, err).endswith(
        f"{bad}: cannot be decoded as an image (cannot identify image file '{tmp_path / 'images' / bad}'): the "
        f"latest complete checkpoint is {latest}; once the data is fixed, the same command with --resume continues"
    )


# ------------------------------------------------------------------------------------------------ config file
def test_unreadable_config_text_and_bad_set_values_are_one_line_errors(tmp_path, demo_dir, capsys, monkeypatch):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"dtype: float32\n# caf\xe9\n")
    status, err = run(["--phase_one", "--config", str(latin1)], capsys)
    assert f"{latin1}: not UTF-8 text" in one_line_error(status, err)
    path = str(write(tmp_path / "c.yaml", tiny_config(demo_dir, tmp_path / "out")))
    status, err = run(["--phase_one", "--config", path, "--set", "training_args.batch_size=[1"], capsys)
    assert "--set 'training_args.batch_size=[1': the value is not valid YAML" in one_line_error(status, err)
    status, err = run(["--phase_one", "--config", path, "--dry_run", "--gpu_memory_gb", "-5"], capsys)
    assert "--gpu_memory_gb: expected a positive number of GB, got '-5'" in one_line_error(status, err)
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    status, err = run(["--phase_one", "--config", path, "--set", "training_args.report_to=[wandb]"], capsys)
    assert "training_args.report_to names wandb, which is not installed" in one_line_error(status, err)
    for module in ("flash_attn", "flash_attn_interface", "flash_attn_3"):
        monkeypatch.setitem(sys.modules, module, None)
    for attention in ("flash_attention_2", "flash_attention_3"):
        status, err = run(["--phase_one", "--config", path, "--set", f"model.attn_implementation={attention}"], capsys)
        assert f"model.attn_implementation={attention} needs" in one_line_error(status, err)


def test_a_phase_two_dry_run_says_when_it_plans_without_the_phase_one_model(tmp_path, demo_dir, capsys):
    two = phase_two_config(demo_dir, tmp_path / "not_yet", tmp_path / "p2")
    two["model"] = {"max_length": 64}
    assert train.main(["--config", str(write(tmp_path / "two.yaml", two)), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert f"note: checkpoint.load_dir {str(tmp_path / 'not_yet')!r} holds no phase-one model yet" in out


def test_checkpoint_markers_without_a_readable_batch_shape_skip_the_resume_batch_check(tmp_path):
    from run_record import saved_batch_shape
    from trainer import COMPLETE_MARKER

    shape = {"processes": 2, "batch_size": 4, "gradient_accumulation_steps": 1}
    for text, expected in (
        (json.dumps({"step": 4, **shape}), shape),
        ("4\n", None),  # written before the shape was recorded
        ('{"step": 4, "processes": 2}', None),  # edited by hand
        ("not json", None),
    ):
        (tmp_path / COMPLETE_MARKER).write_text(text)
        assert saved_batch_shape(tmp_path) == expected


def test_phase_two_from_an_unfinished_phase_one_says_how_to_go_on(tmp_path, demo_dir, capsys):
    (tmp_path / "p1" / "checkpoint-4").mkdir(parents=True)  # phase one killed before its final model
    (tmp_path / "p1" / "checkpoint-4" / "checkpoint_complete").write_text("4\n")
    two = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2")
    status, err = run(["--config", str(write(tmp_path / "two.yaml", two))], capsys)
    assert "holds no final model, only checkpoints of an unfinished run (the last: checkpoint-4)" in (
        one_line_error(status, err)
    )


def test_a_phase_two_dry_run_plans_with_the_configs_runtime_keys(tmp_path, demo_dir, capsys):
    from model import PhiClipConfig, PhiClipMLLM

    model_section = tiny_config(demo_dir, tmp_path / "p1")["model"]
    PhiClipMLLM(PhiClipConfig.from_dict(model_section)).save_pretrained(tmp_path / "p1")  # max_length 64
    two = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2")
    path = str(write(tmp_path / "two.yaml", two))
    for argv, tokens in (([], 64), (["--set", "model.max_length=96"], 96)):  # as train.py: the config's 96 wins
        assert train.main(["--config", path, "--dry_run", *argv]) == 0
        assert f"x {tokens} tokens" in capsys.readouterr().out
    # A LoRA target that matches no layer (the original's CLIP o_proj) is the same one line as in training.
    status, err = run(["--config", path, "--dry_run", "--set", "peft_vision.target_modules=[o_proj]"], capsys)
    assert "peft_vision.target_modules: ['o_proj'] match no linear layer" in one_line_error(status, err)


# ------------------------------------------------------------------------------------------------------ LLaVA
def test_llava_answers_that_are_empty_or_hold_an_image_are_excluded(tmp_path, caplog):
    image = {"image": "x.png"}
    entries = [
        {
            "id": "ok",
            **image,
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        {"id": "empty", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
        {
            "id": "pic",
            **image,
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}],
        },
    ]
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"")
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    records = D.read_llava(tmp_path / "llava.json", tmp_path / "images")
    assert [r.id for r in records] == ["ok"]
    assert "conversations with an empty gpt answer (e.g. id empty)" in caplog.text
    assert "<image> in a gpt turn" in caplog.text and "id pic" in caplog.text


def test_generate_leaves_a_training_model_training_whatever_happens(make_model, tmp_path):
    model = make_model().train()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(D.BadImageError, match="bad.png"):
        generate(model, [f"Describe this image. {D.IMAGE_TOKEN}"], [tmp_path / "bad.png"])
    assert model.training
    assert isinstance(generate(model, ["Hello"], max_new_tokens=2)[0], str) and model.training


@pytest.mark.parametrize("version, refused", [("5.1.0", True), ("5.2.0", False)])
def test_a_resume_that_changes_the_per_device_batch_is_refused_where_transformers_would_ignore_it(
    tmp_path, monkeypatch, version, refused
):
    import run_record
    from trainer import COMPLETE_MARKER, batch_shape

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": 4, **batch_shape(2, 4, 1)}))
    monkeypatch.setattr(run_record, "TRANSFORMERS_VERSION", version)
    run_record.check_resume_point(
        checkpoint, [checkpoint], batch_shape(2, 4, 1), seed=0, phase="one"
    )  # unchanged: always fine
    run_record.check_resume_point(
        checkpoint, [checkpoint], batch_shape(1, 4, 2), seed=0, phase="one"
    )  # accumulation: fine
    one_process = batch_shape(1, 8, 1)  # the same global batch through a larger per-device batch
    if refused:  # 5.0 and 5.1 would train on with the checkpoint's batch_size 4: 1 x 4, not 1 x 8
        with pytest.raises(ConfigError, match=r"transformers 5\.1\.0 resumes with the checkpoint's batch_size \(4\)"):
            run_record.check_resume_point(checkpoint, [checkpoint], one_process, seed=0, phase="one")
    else:
        run_record.check_resume_point(checkpoint, [checkpoint], one_process, seed=0, phase="one")


def test_a_resume_in_the_other_phase_is_refused_for_its_phase_before_its_batch_or_later_checkpoints(tmp_path):
    import run_record
    from trainer import COMPLETE_MARKER, batch_shape

    checkpoints = [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    for step, checkpoint in zip((2, 4), checkpoints):
        checkpoint.mkdir()
        (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": step, **batch_shape(1, 32, 1)}))
        record = run_record.describe_run({"path": "one.yaml", "seed": 0}, "one", training_samples=64)
        (checkpoint / run_record.RUN_RECORD).write_text(record)
    # phase two's usual batch is not phase one's, and the checkpoint given is not the latest
    with pytest.raises(ConfigError, match=r"is of a phase-one run .* this run is phase two: .*checkpoint\.load_dir"):
        run_record.check_resume_point(checkpoints[0], checkpoints, batch_shape(1, 16, 1), seed=0, phase="two")
    assert run_record.recorded_run(checkpoints[0]) == {"phase": "one", "samples": 64, "seed": 0}
    broken = (checkpoints[1] / run_record.RUN_RECORD).read_text() + "seed: [\n"  # YAML broken by hand
    (checkpoints[1] / run_record.RUN_RECORD).write_text(broken)
    assert run_record.recorded_run(checkpoints[1]) == {"phase": "one", "samples": 64}  # its header still says
    (checkpoints[0] / run_record.RUN_RECORD).write_text("seed: 0\n")  # an older or hand-written record: unchecked
    with pytest.raises(ConfigError, match="global batch"):
        run_record.check_resume_point(checkpoints[0], checkpoints[:1], batch_shape(1, 16, 1), seed=0, phase="two")


def test_a_phase_one_model_whose_config_json_has_an_unknown_key_is_named_in_one_line(tmp_path, demo_dir, capsys):
    one = tiny_config(demo_dir, tmp_path / "p1")
    one["training_args"].update(max_steps=1, save_steps=1, eval_steps=None)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", one))]) == 0
    stored = tmp_path / "p1" / "config.json"
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "feature_layr": -2}))  # edited by hand
    two = phase_two_config(demo_dir, tmp_path / "p1", tmp_path / "p2")
    two["model"] = {"vision_feature_layer": -2}  # an architecture key: checked against the stored config first
    status, err = run(["--config", str(write(tmp_path / "two.yaml", two))], capsys)
    assert f"{stored}: unknown key(s) ['feature_layr']" in one_line_error(status, err)


def test_a_tokenizer_directory_that_does_not_load_is_refused_in_one_line(make_model, tmp_path):
    # Compared with the checkpoint's own copy by loading it: a corrupt tokenizer.json raised a TypeError traceback.
    from model import PhiClipMLLM

    make_model().save_pretrained(tmp_path / "checkpoint")
    broken = tmp_path / "broken_tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("[]")
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"broken_tokenizer'.*keeps the tokenizer its embeddings were trained with"):
        PhiClipMLLM.from_pretrained(tmp_path / "checkpoint", tokenizer=str(broken))
