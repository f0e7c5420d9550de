"""Train PhiClipMLLM from a YAML config: phase one (adapter only), phase two (+ LoRA), resume, dry run, demo.

    python train.py --phase_one --config training_configs/phi_clip.yaml     # adapter only
    python train.py --config training_configs/phi_clip_p2.yaml              # LoRA on a phase-one directory
    options: --resume [CHECKPOINT]  --max_steps N  --set key.sub=value (YAML-typed, repeatable)
             --dry_run [--gpu_memory_gb 24]   (meta-device model: parameter counts and a memory estimate)
    python train.py --demo      # synthetic shapes: make-demo, phase one, phase two, exact match on val

Multi-GPU: `accelerate launch train.py ...` or `torchrun --nproc_per_node N train.py ...` run data-parallel through
the transformers Trainer; only rank 0 writes. Relative paths in a config are relative to the working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SchedulerType
from transformers.utils import logging as hf_logging

from dataset import Collator, make_dataset
from generate import generate
from model import IMAGE_TOKEN, PhiClipConfig, PhiClipMLLM

logger = logging.getLogger("train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPLETE_MARKER = "checkpoint_complete"  # written last: a checkpoint directory without it is ignored
REQUIRED, NONE = object(), type(None)
# key: (accepted types, default); a nested dict is a section. Checked before anything is built.
# fmt: off
SCHEMA: dict[str, Any] = {
    "dtype": ((str,), "bfloat16"), "seed": ((int,), 42), "model": ((dict,), None),
    "checkpoint": {"output_dir": ((str,), REQUIRED), "load_dir": ((str, NONE), None)},
    "phase_one": {"annotation_file": ((str,), REQUIRED), "image_directory": ((str,), REQUIRED)},
    "data": {"train": ((dict, NONE), None), "val": ((dict, NONE), None), "num_workers": ((int,), 2),
             "on_bad_image": ((str,), "skip"),
             "eval_captions": ((int,), 4)},
    "training_args": {
        "num_train_epochs": ((float,), 1.0), "max_steps": ((int,), -1), "learning_rate": ((float,), 1e-4),
        "batch_size": ((int,), 8), "eval_batch_size": ((int, NONE), None), "gradient_accumulation_steps": ((int,), 1),
        "warmup_steps": ((float,), 0.03), "lr_scheduler": ((str,), "cosine"), "weight_decay": ((float,), 0.0),
        "max_grad_norm": ((float,), 1.0), "gradient_checkpointing": ((bool,), False), "torch_compile": ((bool,), False), "save_steps": ((int,), 500),
        "save_total_limit": ((int, NONE), 2), "logging_steps": ((int,), 10), "eval_steps": ((int, NONE), 500),
        "report_to": ((str, list), "auto"),
    },
    "peft_text": ((dict, NONE), None), "peft_vision": ((dict, NONE), None),
    "text_warmup": {"steps": ((int,), 0), "learning_rate": ((float,), 1e-3), "batch_size": ((int,), 32),
                    "describe": ((bool,), True)},
}
# fmt: on
OPTIONAL_SECTIONS = {"phase_one"}
PATH_KEYS = ("annotation_file", "image_directory", "data_dir")  # dataset.py's path keys


class ConfigError(ValueError):
    """A config file that cannot be used; raised before any model or data is loaded."""


# ------------------------------------------------------------------------------------------------------- config
def load_config(
    path: str | os.PathLike, overrides: list[str] | tuple = (), phase: str | None = None, check_paths: bool = True
) -> dict[str, Any]:
    """Read, override (`key.sub=value`, YAML-typed) and validate a training config.

    Returns the whole config as nested plain dicts with every key of SCHEMA present (defaults filled in), plus
    `config["path"]` (the file) and `data.train` filled from the seed's `phase_one` section when that is used.
    `model` is a dict that PhiClipConfig.from_dict accepts. `phase` ("one"/"two"/None) adds that phase's checks;
    `check_paths=False` skips file-existence checks (dry runs). Raises ConfigError naming the file and key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected key.sub=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    config = _validate(raw, SCHEMA, path, "")
    config["path"] = str(path)
    _check_semantics(config, path, phase, check_paths)
    return config


def _validate(values: dict, schema: dict, path: Path, where: str) -> dict:
    unknown = sorted(set(values) - set(schema))
    if unknown:
        section = f" in {where[:-1]}" if where else ""
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(where + k for k in unknown)}; valid keys{section}: {list(schema)}"
        )
    result = {}
    for key, spec in schema.items():
        name, value = where + key, values.get(key)
        if isinstance(spec, dict):  # a section
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{path}: {name} must be a section (a mapping), got {value!r}")
            skip = value is None and key in OPTIONAL_SECTIONS
            result[key] = None if skip else _validate(value or {}, spec, path, name + ".")
            continue
        types, default = spec
        if key not in values:
            if default is REQUIRED:
                raise ConfigError(f"{path}: {name} is required")
            result[key] = default
            continue
        if float in types and isinstance(value, (int, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads `1e-4` (no dot) as a string
                value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is NONE else t.__name__ for t in types)
            raise ConfigError(f"{path}: {name} must be {wanted}, got {value!r}")
        result[key] = value
    return result


def _check_semantics(config: dict, path: Path, phase: str | None, check_paths: bool) -> None:
    def require(condition: Any, message: str) -> None:
        if not condition:
            raise ConfigError(f"{path}: {message}")

    require(config["dtype"] in DTYPES, f"dtype must be one of {list(DTYPES)}, got {config['dtype']!r}")
    require(config["model"] is not None or phase != "one", "model is required for phase one")
    if config["model"] is not None:
        try:
            PhiClipConfig.from_dict(config["model"], where="model")
        except (TypeError, ValueError) as error:
            require(False, str(error))
    data, args, ckpt = config["data"], config["training_args"], config["checkpoint"]
    if config["phase_one"] is not None:
        require(data["train"] is None, "give the training data once: phase_one (the seed's keys) or data.train")
        data["train"] = {"format": "coco", **config["phase_one"]}
    require(phase is None or data["train"] is not None, "no training data: add data.train or phase_one")
    policies = ("skip", "error")
    require(
        data["on_bad_image"] in policies, f"data.on_bad_image must be one of {policies}, got {data['on_bad_image']!r}"
    )
    for split in ("train", "val"):  # data.on_bad_image is the default of both splits; a split may set its own
        if data[split] is not None:
            data[split].setdefault("on_bad_image", data["on_bad_image"])
    for key in ("batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps", "learning_rate"):
        require(args[key] > 0, f"training_args.{key} must be positive, got {args[key]}")
    schedulers = [s.value for s in SchedulerType]
    require(args["lr_scheduler"] in schedulers, f"training_args.lr_scheduler must be one of {schedulers}")
    for name in ("peft_text", "peft_vision"):
        if config[name] is not None:
            from peft import LoraConfig

            unknown = sorted(set(config[name]) - {f.name for f in dataclasses.fields(LoraConfig)})
            require(
                not unknown,
                f"unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys: r, lora_alpha, "
                "target_modules, lora_dropout, bias, or another peft LoraConfig field",
            )
            require(
                isinstance(config[name].get("r", 8), int) and config[name].get("target_modules"),
                f"{name} needs an integer r and a target_modules list",
            )
    if phase == "two":
        require(
            config["peft_text"] or config["peft_vision"],
            "phase two needs peft_text and/or peft_vision (pass --phase_one to train the adapter only)",
        )
        require(ckpt["load_dir"], "checkpoint.load_dir is required for phase two: the phase-one output directory")
        require(
            Path(ckpt["load_dir"]).resolve() != Path(ckpt["output_dir"]).resolve(),
            "checkpoint.output_dir must differ from checkpoint.load_dir (the phase-one model)",
        )
        require(
            not check_paths or (Path(ckpt["load_dir"]) / "config.json").is_file(),
            f"checkpoint.load_dir {ckpt['load_dir']!r} is not a phase-one model directory (no config.json); "
            "run phase one first (python train.py --phase_one --config ...)",
        )
    # A hub id is `org/name`; absolute, dotted or deeper names are local paths that must exist.
    paths = [
        (f"model.{k}", v)
        for k, v in (config["model"] or {}).items()
        if k in ("text_model", "vision_model", "tokenizer")
        and isinstance(v, str)
        and (v.startswith((".", "/", "~")) or v.count("/") > 1)
    ]
    for split in ("train", "val"):
        paths += [(f"data.{split}.{k}", str(v)) for k, v in (data[split] or {}).items() if k in PATH_KEYS]
    for name, value in paths if check_paths else ():
        require(Path(value).expanduser().exists(), f"{name}: {value!r} does not exist")


# ------------------------------------------------------------------------------------------------ checkpoints
def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under output_dir that were fully written, oldest step first."""
    found = {
        int(p.name.split("-")[1]): p
        for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", p.name) and (p / COMPLETE_MARKER).is_file()
    }
    return [found[step] for step in sorted(found)]


def _publish(model: PhiClipMLLM, directory: Path) -> None:
    # save_pretrained replaces its target wholesale, but a checkpoint directory also holds Trainer's files (other
    # ranks may be writing theirs) and the output directory holds checkpoints, so stage aside and move in with
    # config.json last: a directory without config.json is not loadable, so readers never see a half model.
    staged = model.save_pretrained(directory.parent / f".{directory.name}.model")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").unlink(missing_ok=True)
    for entry in sorted(staged.iterdir(), key=lambda p: p.name == "config.json"):
        target = directory / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staged.rmdir()


class PhiClipTrainer(Trainer):
    """Trainer that saves our checkpoint layout, marks complete checkpoints and counts bad images."""

    def __init__(self, *args, keep_checkpoints: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints, self.bad_images = keep_checkpoints, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        bad = inputs.pop("num_bad_images", None)  # counted by dataset.Collator, not a model input
        self.bad_images += int(bad) if bad is not None and model.training else 0
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer would write the full state dict (frozen backbones included); ours stores adapter + LoRA.
        if self.args.should_save:
            _publish(self.accelerator.unwrap_model(self.model), Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pass  # build_model already restored the weights with PhiClipMLLM.from_pretrained

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)  # save_total_limit is None there: we rotate complete ones only
        self.accelerator.wait_for_everyone()  # every rank's rng_state file is in before the marker
        if not self.args.should_save:
            return
        root = Path(self.args.output_dir)
        with open(root / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}" / COMPLETE_MARKER, "w") as marker:
            marker.write(f"{self.state.global_step}\n")
            marker.flush()
            os.fsync(marker.fileno())
        complete = complete_checkpoints(root)
        stale = [p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p not in complete]  # killed mid-save
        old = complete[: -self.keep_checkpoints] if self.keep_checkpoints else []
        for directory in stale + list(root.glob(f".{PREFIX_CHECKPOINT_DIR}-*")) + old:
            shutil.rmtree(directory, ignore_errors=True)


class ProgressReport(TrainerCallback):
    """Greedy captions for a few fixed val images at each evaluation; bad-image counts at each epoch end."""

    def __init__(self, trainer: PhiClipTrainer, val_set, count: int):
        self.trainer = trainer
        self.samples = [val_set.sample(i, epoch=0) for i in range(min(count, len(val_set)))] if val_set else []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and self.samples:
            prompts = [s["conversation"][0]["content"] for s in self.samples]
            replies = generate(model, prompts, [s["images"] for s in self.samples], max_new_tokens=32)
            for sample, reply in zip(self.samples, replies):
                logger.info(
                    "step %d caption %s: %r (reference %r)",
                    state.global_step,
                    sample["id"],
                    reply,
                    sample["conversation"][-1]["content"],
                )

    def on_epoch_end(self, args, state, control, **kwargs):
        accelerator, count = self.trainer.accelerator, torch.tensor(self.trainer.bad_images)
        if accelerator.num_processes > 1:
            count = accelerator.reduce(count.to(accelerator.device), "sum").cpu()
        if state.is_world_process_zero:
            logger.info("epoch %.2f: %d bad image(s) skipped", state.epoch or 0, int(count))
        self.trainer.bad_images = 0


# ----------------------------------------------------------------------------------------------------- training
def build_model(config: dict, phase: str, resume_dir: Path | None = None) -> PhiClipMLLM:
    """The model to train: fresh (phase one), from load_dir + LoRA (phase two), or from a checkpoint (resume)."""
    dtype = DTYPES[config["dtype"]]
    if resume_dir is not None:
        model = PhiClipMLLM.from_pretrained(resume_dir, dtype=dtype, trainable=True)
    elif phase == "one":
        model = PhiClipMLLM(PhiClipConfig.from_dict(config["model"]), dtype=dtype).prime_model("one")
    else:
        model = PhiClipMLLM.from_pretrained(config["checkpoint"]["load_dir"], dtype=dtype, trainable=True)
        model.setup_lora(config["peft_text"], config["peft_vision"])
    if config["training_args"]["gradient_checkpointing"]:
        model.enable_gradient_checkpointing()
    if config["training_args"]["torch_compile"]:
        model.compile_language_model()
    return model


def _training_arguments(config: dict, output_dir: str, **changes) -> TrainingArguments:
    args, data = config["training_args"], config["data"]
    report_to = args["report_to"]
    if report_to == "auto":
        report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    evaluate = bool(data["val"] and args["eval_steps"])
    same = (
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "warmup_steps",
        "weight_decay",
        "max_grad_norm",
        "gradient_accumulation_steps",
        "logging_steps",
        "save_steps",
    )
    values = {key: args[key] for key in same} | dict(
        output_dir=output_dir,
        per_device_train_batch_size=args["batch_size"],
        per_device_eval_batch_size=args["eval_batch_size"] or args["batch_size"],
        lr_scheduler_type=args["lr_scheduler"],
        optim="adamw_torch",
        logging_first_step=True,
        save_strategy="steps",
        save_total_limit=None,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=args["eval_steps"] if evaluate else None,
        prediction_loss_only=True,
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=data["num_workers"],
        bf16=config["dtype"] == "bfloat16",
        fp16=config["dtype"] == "float16",
        use_cpu=not torch.cuda.is_available(),
        seed=config["seed"],
        data_seed=config["seed"],
        report_to=report_to,
        ddp_find_unused_parameters=False,
    )
    return TrainingArguments(**(values | changes))


def text_warmup(model: PhiClipMLLM, train_set, config: dict) -> None:
    """Train the LM alone on the training captions, each image described in words instead of shown.

    A stand-in for the pre-training a real Phi-3 brings (the tiny demo's LM is random): it learns the caption
    language and to say what its prompt describes. It never sees an image; the adapter still has to learn to
    turn pixels into something the LM reads. Samples: "<instruction> <caption>" -> "<caption>", or with
    `describe: false` "<instruction>" -> "<caption>" (caption texts only: the LM learns no use of its context,
    and in the demo phase one then reaches 15% exact match instead of 82%, phase two 54% instead of 97%).
    """

    def described(sample: dict) -> dict:
        question, answer = sample["conversation"][0], sample["conversation"][-1]
        words = answer["content"] if config["text_warmup"]["describe"] else ""
        prompt = question["content"].replace(IMAGE_TOKEN, words).strip()
        return {"conversation": [{"role": "user", "content": prompt}, answer], "images": []}

    settings, samples = config["text_warmup"], [described(train_set.sample(i, epoch=0)) for i in range(len(train_set))]
    model.requires_grad_(False)
    model.text_model.requires_grad_(True)
    args = _training_arguments(
        config,
        config["checkpoint"]["output_dir"],
        max_steps=settings["steps"],
        learning_rate=settings["learning_rate"],
        per_device_train_batch_size=settings["batch_size"],
        save_strategy="no",
        eval_strategy="no",
        eval_steps=None,
        report_to="none",
        dataloader_num_workers=0,
        logging_steps=max(1, settings["steps"] // 5),
    )
    Trainer(model=model, args=args, train_dataset=samples, data_collator=Collator(model.processor)).train()
    model.prime_model("one")


def run_training(config: dict, phase: str, resume: bool | str | None = None) -> PhiClipMLLM:
    """Train one phase as configured; writes checkpoints and the final model into checkpoint.output_dir."""
    output_dir = Path(config["checkpoint"]["output_dir"])
    complete = complete_checkpoints(output_dir)
    resume_dir = Path(resume) if isinstance(resume, str) else (complete[-1] if resume and complete else None)
    if resume and (resume_dir is None or not (resume_dir / COMPLETE_MARKER).is_file()):
        raise ConfigError(f"--resume: no complete checkpoint at {resume if isinstance(resume, str) else output_dir}")
    if complete and not resume:
        raise ConfigError(
            f"{output_dir} holds checkpoints of an earlier run: pass --resume to continue it, or set "
            "another checkpoint.output_dir"
        )
    set_seed(config["seed"])
    data = config["data"]
    try:  # data errors are config errors: report them before any weight is loaded
        train_set = make_dataset(data["train"], seed=config["seed"])
        val_set = make_dataset(data["val"], seed=config["seed"]) if data["val"] else None
    except ValueError as error:
        raise ConfigError(f"{config['path']}: data: {error}") from error
    if resume_dir:
        logger.info("resuming from %s", resume_dir)
    started, model = time.time(), build_model(config, phase, resume_dir)
    if phase == "one" and resume_dir is None and config["text_warmup"]["steps"] > 0:
        text_warmup(model, train_set, config)
    counts = model.parameter_counts()
    logger.info("phase %s: %s parameters, %s trainable", phase, f"{counts['total']:,}", f"{counts['trainable']:,}")
    trainer = PhiClipTrainer(
        model=model,
        args=_training_arguments(config, str(output_dir)),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=Collator(model.processor),
        keep_checkpoints=config["training_args"]["save_total_limit"],
    )
    trainer.add_callback(ProgressReport(trainer, val_set, data["eval_captions"]))
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    if trainer.args.should_save:
        _publish(model, output_dir)
        logger.info("phase %s done in %.0f s: model in %s", phase, time.time() - started, output_dir)
    trainer.accelerator.wait_for_everyone()
    return model


# --------------------------------------------------------------------------------------------------------- demo
def run_demo(overrides: list[str] | tuple = ()) -> dict[str, float]:
    """make-demo (if absent), phase one (tiny.yaml), phase two (tiny_p2.yaml); greedy exact match after each."""
    from dataset import make_demo
    from evaluate import evaluate

    # One thread: the tiny matmuls gain little from a second, and a core busy elsewhere stalls every parallel op.
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parent
    os.chdir(root)  # the tiny configs' paths are relative to the repository root
    figures, started = {}, time.time()
    if not Path("data/demo/captions_val.json").is_file():
        make_demo("data/demo")
    figures["make-demo s"] = time.time() - started
    for phase, name in (("one", "tiny.yaml"), ("two", "tiny_p2.yaml")):
        config = load_config(root / "training_configs" / name, overrides, phase=phase)
        shutil.rmtree(config["checkpoint"]["output_dir"], ignore_errors=True)  # demo outputs only
        start = time.time()
        model = run_training(config, phase)
        figures[f"phase {phase} train s"] = time.time() - start
        val, start = make_dataset(config["data"]["val"], seed=config["seed"]), time.time()
        metrics = evaluate(model, val, batch_size=100, max_new_tokens=16)[0]
        figures[f"phase {phase} exact match"] = metrics["exact_match"]
        figures[f"phase {phase} eval s"] = time.time() - start
    figures["chance"] = 1 / len({caption for record in val.records for caption in record.captions})
    figures["val images"], figures["total s"] = len(val), time.time() - started
    print("demo: " + ", ".join(f"{k} {v:.3f}" if v < 1 else f"{k} {v:.0f}" for k, v in figures.items()))
    return figures


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description="Train PhiClipMLLM (phase one: adapter; phase two: LoRA).")
    parser.add_argument("--config", help="YAML training config")
    parser.add_argument("--phase_one", action="store_true", help="train the adapter only (else phase two)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="continue from the latest complete checkpoint in output_dir, or from the one given",
    )
    parser.add_argument("--max_steps", type=int, help="stop after N optimizer steps (overrides the config)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. training_args.learning_rate=2e-4 (repeatable)",
    )
    parser.add_argument("--dry_run", action="store_true", help="report parameters and memory; load nothing")
    parser.add_argument("--gpu_memory_gb", type=float, default=24.0, help="GPU memory to check the estimate against")
    parser.add_argument("--demo", action="store_true", help="run the synthetic-shapes demo end to end")
    args = parser.parse_args(argv)
    rank_zero = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        level=logging.INFO if rank_zero else logging.WARNING,
        datefmt="%H:%M:%S",
        format="%(asctime)s %(name)s: %(message)s",
    )
    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bars; Trainer's own progress bar stays
    overrides = list(args.set) + ([f"training_args.max_steps={args.max_steps}"] if args.max_steps else [])
    try:
        if args.demo:
            run_demo(overrides)
        elif not args.config:
            parser.error("--config is required (or --demo)")
        else:
            phase = "one" if args.phase_one else "two"
            config = load_config(args.config, overrides, phase=phase, check_paths=not args.dry_run)
            if args.dry_run:
                from dry_run import dry_run  # imported here: it imports this module

                print(dry_run(config, phase, args.gpu_memory_gb))
            else:
                run_training(config, phase, args.resume)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
