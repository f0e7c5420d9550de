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
import sys

from config import (
    ADAPTER_FILE,
    RUN_RECORD,
    CommandLine,
    ConfigError,
    last_line,
    same_in_every_process,
    shown_path,
    torch_dtype,
)
from training_config import load_config


def command_line() -> argparse.ArgumentParser:
    """train.py's arguments (see the module docstring)."""
    parser = CommandLine(description="Train PhiClipMLLM (phase one: adapter; phase two: LoRA).")
    parser.add_argument("--config", help="YAML training config")
    parser.add_argument("--phase_one", action="store_true", help="train the adapter only (else phase two)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        help="continue from the latest complete checkpoint in output_dir, or from the one given (a checkpoint-N "
        "directory, or an output directory: its latest)",
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
    parser.add_argument(
        "--gpu_memory_gb", type=_gigabytes, help="with --dry_run: GPU memory to check the estimate against (24)"
    )
    parser.add_argument("--demo", action="store_true", help="run the synthetic-shapes demo end to end")
    return parser


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GB, got {text!r}")
    return value


if __name__ == "__main__":
    command_line().parse_args()  # --help and bad arguments answer here, before torch and transformers load (~6 s)

import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainerState, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import logging as hf_logging

from backbones import CheckpointError, quantize_language_model, use_liger_kernels
from checkpoint import check_architecture
from dataset import BadImageError, BadRecordError, Collator, make_dataset
from model import PhiClipConfig, PhiClipMLLM
from run_record import check_resume_point, check_training_set, describe_run
from text_warmup import text_warmup
from trainer import (
    COMPLETE_MARKER,
    EpochDraws,
    PhiClipTrainer,
    ProgressReport,
    Stopped,
    batch_shape,
    complete_checkpoints,
    finished,
    output_lock,
    rotate_checkpoints,
    sigterm_stops,
    train_with_progress,
    training_arguments,
    writing,
)

logger = logging.getLogger("train")

__all__ = ["ConfigError", "load_config", "complete_checkpoints", "run_training", "run_demo", "main"]


# ----------------------------------------------------------------------------------------------------- training
def build_model(
    config: dict, phase: str, resume_dir: Path | None = None, text_warmup_next: bool = False
) -> PhiClipMLLM:
    """The model to train: fresh (phase one), from load_dir + LoRA (phase two), or from a checkpoint (resume).

    `text_warmup_next`: a fresh phase-one LM is built unquantised, as text_warmup trains it and then quantises it.

    A loaded model takes the YAML's runtime settings (max_length, attn_implementation, ...); an architecture
    setting that disagrees with the loaded checkpoint is an error naming both values.
    """
    dtype, model_section = torch_dtype(config["dtype"]), config["model"] or {}
    source = resume_dir or (Path(config["checkpoint"]["load_dir"]) if phase == "two" else None)
    if source is None:
        if text_warmup_next:
            model_section = {**model_section, "quantize": None}
        with _naming(config["path"]):
            model = PhiClipMLLM(PhiClipConfig.from_dict(model_section), dtype=dtype, device=_build_device())
        model.prime_model("one")
    else:
        runtime = {k: v for k, v in model_section.items() if k in PhiClipConfig.RUNTIME_KEYS}
        with _naming(config["path"]):  # "model.KEY is ... in the config but ...": which config
            check_architecture(model_section, source)
            model = PhiClipMLLM.from_pretrained(source, dtype=dtype, trainable=True, **runtime)
        lora = {name: bool(getattr(model.config, f"lora_{name}")) for name in ("text", "vision")}
        if resume_dir is not None:
            wanted = {name: bool(config[f"peft_{name}"]) and phase == "two" for name in ("text", "vision")}
            if lora != wanted:
                raise ConfigError(
                    f"--resume {resume_dir}: that checkpoint has LoRA on {_which(lora)}, but this phase-{phase} "
                    f"config trains LoRA on {_which(wanted)}: resume a checkpoint of this run (its output_dir)"
                )
        else:
            if config["checkpoint"]["loaded_lora"] == "merge" and any(lora.values()):
                logger.info("merging the loaded LoRA (%s) into the backbones before adding fresh LoRA", _which(lora))
                quantize = model.config.quantize
                model.merge_lora()  # into a dequantised copy of a quantised LM: the update is not rounded
                if quantize and model.config.quantize is None:  # then train on as configured: quantised again
                    attn = model.config.attn_implementation
                    model.text_model = quantize_language_model(model.text_model, quantize, dtype, attn)
                    model.config.quantize = quantize
            try:
                model.setup_lora(config["peft_text"], config["peft_vision"])
            except ValueError as error:  # targets that match nothing, settings that contradict a loaded LoRA
                raise ConfigError(f"{config['path']}: {error}") from None
    training_switches(model, config)
    return model


def training_switches(model: PhiClipMLLM, config: dict) -> None:
    """training_args' switches that change how the LM runs (liger kernels, checkpointing, compilation)."""
    if config["training_args"]["use_liger_kernel"]:
        with _naming(config["path"]):
            use_liger_kernels(model.text_model)
    if config["training_args"]["gradient_checkpointing"]:
        model.enable_gradient_checkpointing()
    if config["training_args"]["torch_compile"]:
        model.compile_language_model()


@contextlib.contextmanager
def _naming(config_file: str):
    """The model code knows a setting's key (model.max_length, ...) but not the YAML it came from: add the file."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(f"{config_file}: {error}") from None


def _build_device() -> torch.device | None:
    # Random (inline) backbones initialise on the GPU this rank trains on: seconds, not minutes on the CPU.
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else None


def _which(flags: dict) -> str:
    return " and ".join(f"the {name} model" for name, on in flags.items() if on) or "neither backbone"


def run_training(
    config: dict, phase: str, resume: bool | str | None = None, callbacks: list[TrainerCallback] | tuple = ()
) -> PhiClipMLLM:
    """Train one phase as configured; writes checkpoints and the final model into checkpoint.output_dir.

    `callbacks` join the Trainer's (bench.py times train.py's steps with one)."""
    output_dir = Path(config["checkpoint"]["output_dir"])
    with output_lock(output_dir):
        return _run_training(config, phase, output_dir, resume, callbacks)


def _starting_point(config: dict, phase: str, output_dir: Path, resume) -> tuple:
    """The checkpoint to resume (or None), the training set and the val set (or None), before any weight loads."""
    complete = complete_checkpoints(output_dir)
    resume_dir = complete[-1] if resume is True and complete else None
    if isinstance(resume, str):
        resume_dir = Path(resume).expanduser()
        inside = [] if (resume_dir / COMPLETE_MARKER).is_file() else complete_checkpoints(resume_dir)
        resume_dir = inside[-1] if inside else resume_dir  # an output directory: its latest checkpoint
    if resume and (resume_dir is None or not (resume_dir / COMPLETE_MARKER).is_file()):
        raise ConfigError(f"--resume: no complete checkpoint at {shown_path(resume_dir or output_dir)}")
    if resume:  # TrainingArguments knows the processes (any launcher) and DataParallel's GPUs
        args = training_arguments(config, str(output_dir))
        now = batch_shape(args.world_size, args.train_batch_size, args.gradient_accumulation_steps)
        check_resume_point(resume_dir, complete, now, config["seed"], phase)
    model_files = [name for name in ("config.json", ADAPTER_FILE) if (output_dir / name).is_file()]
    if model_files and not complete and not resume:  # a finished model, or a backbone's own directory
        raise ConfigError(
            f"{output_dir} already holds a model ({model_files[0]}): set another checkpoint.output_dir or delete it"
        )
    if complete and not resume:
        if finished(complete[-1], config["training_args"]["max_steps"]):
            raise ConfigError(
                f"{output_dir} holds a finished run ({complete[-1].name} is its last step): set another "
                "checkpoint.output_dir or delete it (--resume with a larger --max_steps trains it further)"
            )
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
    if resume_dir is not None:
        check_training_set(resume_dir, len(train_set))
    return resume_dir, train_set, val_set


def _run_training(config: dict, phase: str, output_dir: Path, resume, callbacks) -> PhiClipMLLM:
    with same_in_every_process():
        resume_dir, train_set, val_set = _starting_point(config, phase, output_dir, resume)
    if resume_dir:
        logger.info("resuming from %s", resume_dir)
    warm_up = phase == "one" and resume_dir is None and config["text_warmup"]["steps"] > 0
    started, model = time.time(), build_model(config, phase, resume_dir, text_warmup_next=warm_up)
    settings = {k: v for k, v in model.config.to_dict().items() if k not in ("lora_text", "lora_vision", "revisions")}
    if warm_up:  # built unquantised for the warm-up, quantised after it: say what phase one trains on
        settings["quantize"] = (config["model"] or {}).get("quantize")
    logger.info("model: %s", ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, dict)))
    for dataset in (train_set, val_set):
        if dataset is not None:
            dataset.attach(model.processor)  # samples too long for max_length are skipped and counted
    if warm_up:
        text_warmup(model, train_set, config)
        if model.config.quantize:  # quantised after the warm-up: the switches were set on the unquantised LM
            training_switches(model, config)
    elif phase == "two" and config["text_warmup"]["steps"] > 0:  # e.g. one --set for both phases of the demo
        logger.warning("text_warmup runs before phase one only: phase two trains on the model it loads")
    counts, trains = model.parameter_counts(), "the adapter" if phase == "one" else "the adapter and LoRA"
    # Where the run starts from and writes to, for a log read later: the model of a phase-two start is load_dir's.
    source = f" from {config['checkpoint']['load_dir']}" if phase == "two" and resume_dir is None else ""
    logger.info(
        "phase %s: training %s, %s of %s parameters (%d training samples)%s into %s",
        phase,
        trains,
        f"{counts['trainable']:,}",
        f"{counts['total']:,}",
        len(train_set),
        source,
        output_dir,
    )
    trainer = PhiClipTrainer(
        model=model,
        args=training_arguments(config, str(output_dir)),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=Collator(model.processor),
        keep_checkpoints=config["training_args"]["save_total_limit"],
        run_record=describe_run(config, phase, resume_dir, len(train_set)),
    )
    processes, per_process = trainer.args.world_size, trainer.args.train_batch_size
    repeated = -len(train_set) % (processes * per_process)
    if processes > 1 and repeated:  # accelerate's even_batches: every process takes the same number of batches
        logger.info(
            "an epoch's last step repeats %d sample(s) from its start to fill %d processes", repeated, processes
        )
    trainer.add_callback(EpochDraws(train_set))
    trainer.add_callback(ProgressReport(trainer, val_set, config["data"]["eval_captions"], f"phase {phase}"))
    for callback in callbacks:
        trainer.add_callback(callback)
    if resume_dir is not None and finished(resume_dir, config["training_args"]["max_steps"]):
        # Trainer would take one more step past max_steps; the run was killed while writing its final model.
        logger.info("%s is the last step of the run: writing the final model only", resume_dir.name)
        if trainer.args.should_save:  # a kill between that checkpoint's marker and the rotation kept one too many
            rotate_checkpoints(output_dir, config["training_args"]["save_total_limit"])
        trainer.state = TrainerState.load_from_json(str(resume_dir / TRAINER_STATE_NAME))  # the run's log, for it
    else:
        train_with_progress(trainer, f"phase {phase}", resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    if trainer.args.should_save:
        with writing(output_dir, output_dir):
            model.save_pretrained(output_dir)
            (output_dir / RUN_RECORD).write_text(trainer.run_record, encoding="utf-8")
            # trainer_state.json, the whole run's log_history to its end: a checkpoint's stops at its step, before
            # the last epoch's skipped-sample counts and the run's train_loss and runtime.
            trainer.save_state()
        logger.info("phase %s done in %.0f s: model in %s", phase, time.time() - started, output_dir)
    trainer.accelerator.wait_for_everyone()
    return model.eval()  # ready to use: LoRA dropout off, as from_pretrained returns a model


# --------------------------------------------------------------------------------------------------------- demo
def run_demo(overrides: list[str] | tuple = ()) -> dict[str, float]:
    """make-demo (unless data/demo holds this shapes.py's whole set), phase one (tiny.yaml: captions), phase two
    (tiny_p2.yaml: captions + conversations).

    On held-out images: greedy caption exact match after each phase, and answer accuracy (each answered turn of a
    conversation, given the turns before it) after phase two, each beside its chance level.
    """
    from evaluate import answered_turns, evaluate
    from shapes import demo_captions, demo_chance, demo_is_current, make_demo

    moved = [o for o in overrides if o.split("=", 1)[0].strip().startswith("checkpoint.")]
    if moved:  # one --set serves both phases: phase two would write over phase one, or load an older model
        raise ConfigError(
            f"--demo writes checkpoints/tiny_p1 and checkpoints/tiny_p2 and does not take {moved[0]!r}: to train "
            "into other directories, run the phases with training_configs/tiny.yaml and tiny_p2.yaml"
        )

    root = Path(__file__).resolve().parent
    if not (root / "training_configs" / "tiny_p2.yaml").is_file():  # `pip install .` copies the modules only
        raise ConfigError(f"--demo runs in a clone of the repository: {root / 'training_configs'} not found")
    # One thread: the tiny matmuls gain little from a second, and a core busy elsewhere stalls every parallel op.
    threads, cwd = torch.get_num_threads(), os.getcwd()
    torch.set_num_threads(1)
    os.chdir(root)  # the tiny configs' paths are relative to the repository root
    try:  # the caller's working directory and threads are its own again afterwards (a notebook)
        figures, started = {}, time.time()
        if not demo_is_current("data/demo"):  # absent, cut short, or made by an older shapes.py: figures differ
            make_demo("data/demo")
        figures["make-demo s"] = time.time() - started
        for phase, name in (("one", "tiny.yaml"), ("two", "tiny_p2.yaml")):
            config = load_config(root / "training_configs" / name, overrides, phase=phase)
            _remove_demo_output(Path(config["checkpoint"]["output_dir"]))
            start = time.time()
            model = run_training(config, phase)
            figures[f"phase {phase} train s"] = time.time() - start
            val, start = make_dataset(config["data"]["val"], seed=config["seed"]), time.time()
            # Exact match and answer accuracy only, which no tokenisation changes: PTB's and METEOR's java (~12 s to
            # start, 1.2 GB kept while phase two trains) would score what the demo never shows.
            metrics = evaluate(model, val, batch_size=100, max_new_tokens=16, caption_tokenizer="simple")[0]
            figures[f"phase {phase} caption exact match"] = metrics["exact_match"]
            if "answer_accuracy" in metrics:
                figures[f"phase {phase} answer accuracy"] = metrics["answer_accuracy"]
            figures[f"phase {phase} eval s"] = time.time() - start
        turns = answered_turns(val)
        figures["caption chance"] = 1 / len(demo_captions())
        figures["answer chance"] = sum(demo_chance(turn["history"][-1]["content"]) for turn in turns) / len(turns)
        figures["val images"] = sum(not record.conversation for record in val.records)
        figures["val answers"], figures["total s"] = len(turns), time.time() - started
        whole = (" s", "images", "answers")  # seconds and counts; the rest are rates
        print("demo: " + ", ".join(f"{k} {v:.0f}" if k.endswith(whole) else f"{k} {v:.3f}" for k, v in figures.items()))
        return figures
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def _remove_demo_output(directory: Path) -> None:
    """Delete an earlier demo run's output directory; refuse to delete a directory that is not a training output."""
    if not directory.exists():
        return
    ours = (directory / "config.json").is_file() or any(directory.glob("checkpoint-*")) or not any(directory.iterdir())
    if not ours:
        raise ConfigError(f"{directory} holds files that are not a training output: move them, the demo writes there")
    shutil.rmtree(directory)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring); returns the exit status."""
    parser = command_line()
    args = parser.parse_args(argv)
    rank_zero, first_here = (int(os.environ.get(name, "0")) == 0 for name in ("RANK", "LOCAL_RANK"))
    # Every process of a torchrun / accelerate launch run reads the same config and files: what they all find alike
    # (warnings before training, same_in_every_process errors, the dry run) the first on each machine reports.
    logging.basicConfig(
        level=logging.INFO if rank_zero else logging.WARNING if first_here else logging.ERROR,
        datefmt="%H:%M:%S",
        format="%(asctime)s %(name)s: %(message)s",
    )
    # transformers prints its own records, and also hands them to the root logger where CI is set (GitHub
    # Actions sets it): this handler would print each of its warnings a second time.
    hf_logging.disable_propagation()
    overrides = list(args.set) + ([f"training_args.max_steps={args.max_steps}"] if args.max_steps is not None else [])
    given = {"--config": args.config, "--phase_one": args.phase_one, "--resume": args.resume, "--dry_run": args.dry_run}
    if args.demo and any(given.values()):  # the demo has its own configs and output directories
        parser.error(
            f"--demo takes no {', '.join(flag for flag, value in given.items() if value)} (only --set, --max_steps)"
        )
    if args.demo and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would delete and rewrite its files
        return parser.error("--demo runs in one process: python train.py --demo (no launcher)") if first_here else 2
    if args.gpu_memory_gb is not None and not args.dry_run:
        parser.error("--gpu_memory_gb only sizes a --dry_run's estimate")
    if args.dry_run and args.resume:
        parser.error("--dry_run plans the configured run from its start; drop --resume")
    config = None
    try:
        with sigterm_stops():
            if args.demo:
                run_demo(overrides)
            elif not args.config:
                parser.error("--config is required (or --demo)")
            else:
                phase = "one" if args.phase_one else "two"
                with same_in_every_process():
                    config = load_config(
                        args.config, overrides, phase=phase, check_paths=not args.dry_run, resuming=bool(args.resume)
                    )
                if args.dry_run:
                    from dry_run import dry_run

                    if first_here:
                        print(dry_run(config, phase, args.gpu_memory_gb or 24.0))
                else:
                    run_training(config, phase, args.resume)
    except (ConfigError, CheckpointError, FileNotFoundError, BadImageError, BadRecordError) as error:
        bad_data = isinstance(error, BadImageError | BadRecordError)  # on_bad_*: error; a worker's has its traceback
        message = f"error: {last_line(error) if bad_data else error}"
        if bad_data and config is not None:  # met in a batch: the run stopped part-way, as a Ctrl-C stops it
            message += _how_to_go_on(config["checkpoint"]["output_dir"], "once the data is fixed, ")
        if first_here or not getattr(error, "same_in_every_process", False):
            print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Stopped); the lock is released by now
        signum = signal.SIGTERM if isinstance(stop, Stopped) else signal.SIGINT
        if threading.current_thread() is threading.main_thread():  # DataLoader workers got the signal too: their
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # deaths are no news (torch's handler would raise)
        message = f"error: stopped by {signum.name}"
        if args.demo:
            message += ": the demo starts over when run again"
        elif config is not None and not args.dry_run:
            message += _how_to_go_on(config["checkpoint"]["output_dir"])
        if rank_zero:  # every process of a torchrun / accelerate launch run is stopped: one says so
            print(message, file=sys.stderr)
        return 128 + signum
    return 0


def _how_to_go_on(output_dir: str, condition: str = "") -> str:
    """The end of the last line of a run stopped part-way: where it can continue from, and how."""
    complete = complete_checkpoints(output_dir)
    if complete:
        return (
            f": the latest complete checkpoint is {complete[-1]}; {condition}the same command with --resume continues"
        )
    return f" before any checkpoint was complete: {condition}the same command starts the run again"


if __name__ == "__main__":
    sys.exit(main())
