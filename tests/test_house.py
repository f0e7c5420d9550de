"""The house: no import circles, quick --help, one-line input errors, installable, quiet and labelled logs."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, TINY_TEXT, TINY_VISION, random_image
from transformers import CLIPConfig, CLIPModel

from model import PhiClipConfig, PhiClipMLLM
from shapes import make_demo

COMMANDS = ("train.py", "generate.py", "evaluate.py")
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
NOISE = ("FutureWarning", "Loading weights", "LOAD REPORT", "UNEXPECTED", "Traceback", "\r")


def project_imports() -> dict[str, set[str]]:
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
        graph[name] = (imported & set(modules)) - {name}
    return graph


def test_project_modules_import_each_other_without_cycles():
    graph, state, cycles = project_imports(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                cycles.append(path[path.index(dependency) :] + [dependency])
            elif dependency not in state:
                visit(dependency, path + [dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)
    assert graph["config"] == set() and graph["processor"] == {"config"}  # the bottom of the house
    # Nothing imports the trainer, except the benchmarks at the very bottom (they measure train.py's own step).
    benchmarks = {name for name in graph if name.startswith("bench")}
    assert "train" not in set().union(*(graph[m] for m in graph if m not in {"train"} | benchmarks))
    assert not benchmarks & set().union(*(graph[m] for m in graph if m not in benchmarks))


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_without_importing_torch(command):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", command, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not {"torch", "transformers", "numpy"} & imported


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate.py", "--checkpoint", "nowhere", "--image", "x.jpg"], "--checkpoint nowhere: no such directory"),
        (["generate.py", "--checkpoint", "."], "the following arguments are required: --image"),
        (["generate.py", "--checkpoint", "CKPT", "--image", "missing.jpg"], "--image missing.jpg: no such file"),
        (["generate.py", "--checkpoint", "CKPT", "--image", "IMG", "--max_new_tokens", "x"], "invalid int value"),
        (["generate.py", "--checkpoint", "training_configs", "--image", "IMG"], "not a PhiClipMLLM checkpoint"),
        (["evaluate.py", "--checkpoint", "CKPT", "--config", "nowhere.yaml"], "nowhere.yaml: config file not found"),
        (["evaluate.py", "--checkpoint", "CKPT", "--config", "CFG", "--limit", "0"], "--limit must be positive"),
        (["evaluate.py", "--checkpoint", "CKPT", "--config", "CFG", "--split", "test"], "invalid choice: 'test'"),
        (["train.py", "--config", "nowhere.yaml"], "nowhere.yaml: config file not found"),
        (["train.py", "--max_steps", "ten"], "invalid int value: 'ten'"),
    ],
)
def test_bad_input_is_one_error_line_before_any_model_loads(tmp_path, argv, expected):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")  # never read: every case fails before loading
    random_image(0).save(tmp_path / "photo.png")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"checkpoint": {"output_dir": "out"}}))
    names = {"CKPT": str(tmp_path / "ckpt"), "IMG": str(tmp_path / "photo.png"), "CFG": str(tmp_path / "c.yaml")}
    argv = [names.get(arg, arg) for arg in argv]
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr


def test_every_module_is_installed_by_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted(path.stem for path in ROOT.glob("*.py"))


def test_readme_notebook_snippet_runs_from_any_directory(make_model, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = next(
        block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "from generate import generate" in block
    )
    assert '"checkpoints/phi_clip_p2"' in snippet
    make_model().save_pretrained(tmp_path / "tiny")
    work = tmp_path / "notebook"
    work.mkdir()
    for i, name in enumerate(("photo.jpg", "a.jpg", "b.jpg")):
        random_image(i).save(work / name)
    script = snippet.replace('"checkpoints/phi_clip_p2"', repr(str(tmp_path / "tiny")))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=CLEAN_ENV, capture_output=True, text=True, timeout=300
    )
    if "No module named 'generate'" in result.stderr:
        pytest.fail("the project is not installed: run `pip install -e .` (as .ci/run does)")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not [noise for noise in NOISE if noise in result.stderr], result.stderr[-3000:]


def test_vision_tower_loads_exactly_and_quietly_from_a_full_clip_checkpoint(tiny_tokenizer_dir, tmp_path, capfd):
    vision = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    clip.save_pretrained(tmp_path / "clip")
    capfd.readouterr()
    config = PhiClipConfig(
        text_model=dict(TINY_TEXT), vision_model=str(tmp_path / "clip"), tokenizer=str(tiny_tokenizer_dir)
    )
    model = PhiClipMLLM(config)
    reference = clip.vision_model.state_dict()
    # transformers 5.0 keeps a "vision_model." prefix on these keys that later 5.x releases drop
    loaded = {key.removeprefix("vision_model."): tensor for key, tensor in model.vision_model.state_dict().items()}
    assert loaded and all(torch.equal(tensor, reference[key]) for key, tensor in loaded.items())
    captured = capfd.readouterr()
    assert not [noise for noise in NOISE if noise in captured.err + captured.out], captured.err


@pytest.mark.slow
def test_a_captured_two_phase_run_logs_labelled_lines_without_noise(tmp_path):
    make_demo(tmp_path / "demo", n=340, conversations=240)
    data = {"format": "coco", "image_directory": str(tmp_path / "demo" / "images")}
    common = {
        "dtype": "float32",
        "data": {
            "train": {**data, "annotation_file": str(tmp_path / "demo" / "captions_train.json")},
            "val": {**data, "annotation_file": str(tmp_path / "demo" / "captions_val.json"), "max_samples": 4},
            "num_workers": 0,
            "eval_captions": 1,
        },
        "training_args": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "eval_steps": 2, "report_to": "none"},
    }
    one = {
        **common,
        "model": {"text_model": dict(TINY_TEXT), "vision_model": dict(TINY_VISION), "adapter_dim": 16},
        "checkpoint": {"output_dir": str(tmp_path / "p1")},
        "text_warmup": {"steps": 2, "batch_size": 4},
    }
    one["model"]["tokenizer"] = str(tmp_path / "demo" / "tokenizer")
    two = {
        **common,
        "checkpoint": {"load_dir": str(tmp_path / "p1"), "output_dir": str(tmp_path / "p2")},
        "peft_text": {"r": 2, "target_modules": ["qkv_proj"]},
        "peft_vision": {"r": 2, "target_modules": ["q_proj"]},
    }
    runs = []
    for name, config, flags in (("one", one, ["--phase_one"]), ("two", two, [])):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        command = [sys.executable, str(ROOT / "train.py"), "--config", str(tmp_path / f"{name}.yaml"), *flags]
        runs.append(subprocess.run(command, cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=300))
        assert runs[-1].returncode == 0, runs[-1].stderr[-3000:]
    image = tmp_path / "demo" / "images" / "000001.png"
    command = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(tmp_path / "p2"), "--image", str(image)]
    runs.append(subprocess.run(command, cwd=tmp_path, env=CLEAN_ENV, capture_output=True, text=True, timeout=300))
    assert runs[-1].returncode == 0 and runs[-1].stderr == "", runs[-1].stderr
    assert len(runs[-1].stdout.splitlines()) == 1  # the reply alone
    log = runs[0].stderr + runs[1].stderr
    assert not [noise for noise in NOISE if noise in log + runs[0].stdout + runs[1].stdout], log
    assert not re.search(r"^\{'", log, re.M), log  # no bare Trainer dicts
    for announced in ("text warm-up: 2 steps", "phase one: training the adapter", "phase two: training the adapter"):
        assert announced in log, log
    for labelled in ("text warm-up step 1/2: loss", "phase one step 2/2: eval_loss", "phase two step 1/2: loss"):
        assert labelled in log, log
    for labelled in ("phase one step 2 caption", "phase two step 2 caption", "phase one epoch", "phase two epoch"):
        assert labelled in log, log  # the report's lines too: a demo's log holds both phases' steps 1, 2, ...
    p1, p2 = (re.escape(str(tmp_path / name)) for name in ("p1", "p2"))  # where each run starts from and writes
    assert re.search(rf"phase one: training the adapter, .* into {p1}$", log, re.M), log
    assert re.search(rf"phase two: training the adapter and LoRA, .* from {p1} into {p2}$", log, re.M), log
    assert re.search(r"phase two step 1/2: loss .*, left \d+:\d\d:\d\d$", log, re.M), log  # time left at this pace
