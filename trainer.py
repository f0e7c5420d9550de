"""The Trainer as train.py runs it: its TrainingArguments, our checkpoint layout, the output directory's lock,
labelled progress, and SIGTERM stopping a run as Ctrl-C does.

A checkpoint directory holds adapter + LoRA (not the frozen backbones Trainer would write) and counts only once its
COMPLETE_MARKER is in: rotation keeps the newest complete ones and removes half-written ones. One run at a time
writes an output directory (LOCK_FILE). Log lines carry the phase and step; on a terminal a progress bar sits
below them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput

from backbones import CheckpointError, read_config_file
from config import COMPLETE_MARKER, RUN_RECORD, ConfigError, complete_checkpoints, last_line
from dataset import SKIPPED, BadImageError, BadRecordError, skipped_name
from generate import generate
from model import loss_per_sample
from processor import IMAGE_TOKEN

logger = logging.getLogger("train")

LOCK_FILE = "train.lock"  # a live run's pid and host


class PhiClipTrainer(Trainer):
    """Trainer that saves our checkpoint layout, marks complete checkpoints and counts skipped samples."""

    def __init__(self, *args, keep_checkpoints: int | None = None, run_record: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints, self.skipped = keep_checkpoints, dict.fromkeys(SKIPPED, 0)
        self.run_record = run_record  # written into each checkpoint beside the weights
        for callback in list(self.callback_handler.callbacks):
            if type(callback) is TensorBoardCallback:
                self.callback_handler.remove_callback(callback)
                self.callback_handler.add_callback(ResumableTensorBoard())

    def compute_loss(
        self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """Trainer's loss, after taking the collator's skipped-sample counts out of the batch."""
        for key in SKIPPED:  # not model inputs
            count = inputs.pop(key, None)
            self.skipped[key] += int(count) if count is not None and model.training else 0
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log without total_flos, which Trainer counts only for a transformers model (here always 0)."""
        logs.pop("total_flos", None)
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """The loss per supervised token over the whole split, as evaluate.py reports it.

        Trainer's own loop averages each batch's mean loss over samples, so its eval_loss would weigh a short
        answer's tokens more and change with eval_batch_size. Hand-written because Trainer has no token-weighted
        evaluation: per-sample loss sums and token counts, gathered with accelerate's gather_for_metrics, which
        drops the samples its sharded loader repeats to fill the last batch of several processes.
        """
        model = self._wrap_model(self.model, training=False)  # DataParallel over several GPUs, never DDP (no grads)
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = samples = 0
        skipped = torch.zeros(len(SKIPPED), dtype=torch.long)
        for inputs in dataloader:
            skipped += torch.stack([inputs[key].cpu() if key in inputs else torch.tensor(0) for key in SKIPPED])
            inputs = self._prepare_inputs({k: v for k, v in inputs.items() if k not in SKIPPED})
            with torch.no_grad(), self.compute_loss_context_manager():
                logits = model(**inputs).logits  # the supervised positions' logits, row by row
            sums, counts = self.accelerator.gather_for_metrics(loss_per_sample(logits, inputs["labels"]))
            loss_sum += sums.double().sum().cpu()
            tokens, samples = tokens + int(counts.sum()), samples + len(counts)
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        metrics = {f"{metric_key_prefix}_loss": float(loss_sum) / max(tokens, 1)}
        if self.accelerator.num_processes > 1:
            skipped = self.accelerator.reduce(skipped.to(self.accelerator.device), "sum").cpu()
        # The loss above left these samples out (each replaced by the next usable one): said beside it where any.
        metrics |= {f"{metric_key_prefix}_{skipped_name(k)}": n for k, n in zip(SKIPPED, skipped.tolist()) if n}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=samples)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer would write the full state dict (frozen backbones included); ours stores adapter + LoRA.
        if self.args.should_save:
            directory = Path(output_dir or self.args.output_dir)
            self.accelerator.unwrap_model(self.model).save_pretrained(directory)
            if self.run_record is not None:
                (directory / RUN_RECORD).write_text(self.run_record, encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        pass  # build_model already restored the weights with PhiClipMLLM.from_pretrained

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        scheduler = self.lr_scheduler
        if checkpoint is None or not hasattr(scheduler, "lr_lambdas"):  # LambdaLR: Trainer's schedules
            return self._restore_optimizer_and_scheduler(checkpoint)
        configured = [{k: group[k] for k in ("initial_lr", "weight_decay")} for group in self.optimizer.param_groups]
        self._restore_optimizer_and_scheduler(checkpoint)
        # The restored optimizer holds the checkpoint's learning rate and weight decay, and the rate the old
        # schedule reached (0 at the end of a finished run). The config's values win, as everywhere else on a
        # resume, and the rate is recomputed from the current schedule at the restored step: the same values when
        # nothing changed, the first step at the right rate when max_steps grew.
        restored = self.optimizer.param_groups[0]
        if (restored["initial_lr"], restored["weight_decay"]) != tuple(configured[0].values()):
            logger.info(
                "resuming with learning_rate %g and weight_decay %g as configured (the checkpoint's: %g and %g)",
                *configured[0].values(),
                restored["initial_lr"],
                restored["weight_decay"],
            )
        for group, settings in zip(self.optimizer.param_groups, configured):
            group.update(settings)
        scheduler.base_lrs = [settings["initial_lr"] for settings in configured]
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(self.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates

    def _restore_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        files = [Path(checkpoint or "") / name for name in (OPTIMIZER_NAME, SCHEDULER_NAME)]
        several_on_cpu = self.args.world_size > 1 and self.args.device.type == "cpu"
        if not (checkpoint and several_on_cpu and all(file.is_file() for file in files)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        # Several processes on the CPU (torchrun, gloo): transformers before 5.18 maps the state to this process's
        # device, "cpu:0", which torch.load cannot restore (the resume died in every process); load both as later
        # versions and one process do, onto "cpu".
        self.optimizer.load_state_dict(torch.load(files[0], map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(files[1], weights_only=True))

    def _save_checkpoint(self, model, trial) -> None:
        root = Path(self.args.output_dir)
        target = root / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with writing(target, root, remove_partial=self.args.should_save):
            if self.args.should_save:  # a leftover of this step (a killed save) is not complete while rewritten
                (target / COMPLETE_MARKER).unlink(missing_ok=True)
            super()._save_checkpoint(model, trial)  # save_total_limit is None there: we rotate complete ones only
            self.accelerator.wait_for_everyone()  # every rank's rng_state file is in before the marker
            if not self.args.should_save:
                return
            args = self.args  # train_batch_size: per process, times DataParallel's GPUs
            shape = batch_shape(args.world_size, args.train_batch_size, args.gradient_accumulation_steps)
            with open(target / COMPLETE_MARKER, "w") as marker:
                marker.write(json.dumps({"step": self.state.global_step, **shape}) + "\n")
                marker.flush()
                os.fsync(marker.fileno())
        rotate_checkpoints(root, self.keep_checkpoints)


def rotate_checkpoints(root: Path, keep: int | None) -> None:
    """Remove half-written checkpoints (killed mid-save) and all but the `keep` newest complete ones. Each loses its
    COMPLETE_MARKER first: a removal cut short leaves a directory that no longer counts as a checkpoint."""
    complete = complete_checkpoints(root)
    stale = [p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p not in complete]
    old = complete[:-keep] if keep else []
    for directory in stale + list(root.glob(f".{PREFIX_CHECKPOINT_DIR}-*")) + old:
        with contextlib.suppress(OSError):  # e.g. a file that is no directory: rmtree leaves it alone as well
            (directory / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)


class ResumableTensorBoard(TensorBoardCallback):
    """transformers' TensorBoard callback writing to <output_dir>/runs, one TensorBoard run per output directory.

    transformers names a directory per start by its time and host, so each resume was a new run whose first steps
    repeated the stopped run's last ones. Here the writer's purge_step is the first step the run logs: TensorBoard
    hides what a stopped run logged past the checkpoint it was resumed from, and the curve goes on from there.
    """

    purge_step: int | None = None  # set as training starts, used by the writer made then only

    def on_train_begin(self, args, state, control, **kwargs):
        if self.logging_dir is None:  # TENSORBOARD_LOGGING_DIR still wins, as in transformers
            self.logging_dir = os.path.join(args.output_dir, "runs")
        # A fresh start hides all of a run killed before its first checkpoint (its step-0 text too).
        self.purge_step = state.global_step + 1 if state.global_step else 0
        super().on_train_begin(args, state, control, **kwargs)

    def _init_summary_writer(self, args):
        # Once: a writer made again after on_train_end (an evaluate() logging) would hide this run's own steps.
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=self.purge_step)
        self.purge_step = None


class EpochDraws(TrainerCallback):
    """Tells the training set each epoch's number, from which it draws that epoch's instructions and captions."""

    def __init__(self, train_set: Dataset) -> None:
        self.train_set = train_set

    def on_epoch_begin(self, args, state, control, **kwargs):
        # accelerate's sharded loader (several processes) does not pass the epoch on to the dataset; the workers
        # copy it when the epoch's iterator starts.
        self.train_set.set_epoch(math.floor((state.epoch or 0) + 1e-6))


class ProgressReport(TrainerCallback):
    """Greedy captions for a few fixed val images at each evaluation (in the log, and in tensorboard as text);
    skipped-sample counts at each epoch end (in the log, in tensorboard and in trainer_state.json's log_history)."""

    def __init__(self, trainer: PhiClipTrainer, val_set: Dataset | None, count: int, stage: str = "training"):
        self.trainer, self.samples, self.stage = trainer, [], stage
        for index in range(len(val_set) if val_set and count else 0):
            try:  # the first usable samples: bad images and records are skipped as the val loss skips them
                sample = val_set[index]
            except (BadImageError, BadRecordError):  # on_bad_*: error; the evaluation itself will report it
                break
            if sample["id"] not in {s["id"] for s in self.samples}:
                self.samples.append(sample)
            if len(self.samples) == count:
                break

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not (state.is_world_process_zero and self.samples):
            return
        prompts = [s["conversation"][0]["content"] for s in self.samples]
        # The first question, with the images it shows (a conversation may show its image in a later question).
        images = [s["images"][: prompt.count(IMAGE_TOKEN)] for s, prompt in zip(self.samples, prompts)]
        replies = generate(model, prompts, images, max_new_tokens=32)
        lines, step = [], f"{self.stage} step {state.global_step}"
        for sample, reply in zip(self.samples, replies):
            reference = sample["conversation"][1]["content"]
            logger.info("%s caption %s: %r (reference %r)", step, sample["id"], reply, reference)
            lines.append(f"| {sample['id']} | {reply} | {reference} |")
        if (board := self._board()) is not None:
            table = "| sample | reply | reference |\n|---|---|---|\n" + "\n".join(lines)
            board.add_text("eval/captions", table, state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        counts = torch.tensor([self.trainer.skipped[key] for key in SKIPPED])
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), "sum").cpu()
        values = {skipped_name(key): int(n) for key, n in zip(SKIPPED, counts)}
        state.log_history.append({"epoch": state.epoch or 0, **values, "step": state.global_step})
        if state.is_world_process_zero:
            skipped = ", ".join(f"{int(n)} {what} skipped" for n, what in zip(counts, SKIPPED.values()))
            logger.info("%s epoch %.2f: %s", self.stage, state.epoch or 0, skipped)
            for name, value in values.items() if (board := self._board()) is not None else ():
                board.add_scalar(f"train/{name}", value, state.global_step)
        self.trainer.skipped = dict.fromkeys(SKIPPED, 0)

    def _board(self) -> Any:
        """The TensorBoard writer of this run (None when it reports to no TensorBoard, or not from this process)."""
        boards = [c for c in self.trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
        return boards[0].tb_writer if boards else None


class LogLines(TrainerCallback):
    """One labelled log line per logging step, with the time left at this run's pace (Trainer itself prints bare
    dicts, or writes through its bar, whose estimate a captured log never shows)."""

    def __init__(self, stage: str):
        self.stage, self.start = stage, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = (time.monotonic(), state.global_step)  # a resumed run starts past step 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
            started, first_step = self.start or (time.monotonic(), state.global_step)
            done, elapsed = state.global_step - first_step, time.monotonic() - started
            if done > 0 and state.max_steps > state.global_step:
                left = round(elapsed / done * (state.max_steps - state.global_step))
                values += f", left {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
            logger.info("%s step %d/%d: %s", self.stage, state.global_step, state.max_steps, values)


class ProgressBar(ProgressCallback):
    """Trainer's progress bar (on a terminal) without its raw log dicts: LogLines writes those."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def train_with_progress(trainer: Trainer, stage: str, **train_kwargs: Any) -> None:
    """trainer.train() with labelled log lines; on a terminal, log lines print above the bar, never into it. A
    process other than the first on its machine, quiet while it repeated the first one's start-up, warns from here."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if not trainer.args.disable_tqdm:
        trainer.add_callback(ProgressBar())
    trainer.add_callback(LogLines(stage))
    root = logging.getLogger()
    if int(os.environ.get("LOCAL_RANK", "0")) and root.level > logging.WARNING:
        root.setLevel(logging.WARNING)  # train.py quietened this process's start-up; its own batches are news
    with logging_redirect_tqdm():
        trainer.train(**train_kwargs)


def batch_shape(processes: int, batch_size: int, accumulation: int) -> dict[str, int]:
    """What one optimizer step consumes: a resumed run continues the data and the schedule only if it is the same."""
    return {"processes": processes, "batch_size": batch_size, "gradient_accumulation_steps": accumulation}


def finished(checkpoint: Path, max_steps: int = -1) -> bool:
    """Whether `checkpoint` is the last step: of `max_steps` when given (> 0; a resume may extend a run), else of
    the run that wrote it."""
    state = read_config_file(checkpoint / "trainer_state.json", "Trainer state")
    last = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return 0 < last <= state.get("global_step", 0)


@contextlib.contextmanager
def writing(target: Path, root: Path, remove_partial: bool = False) -> Iterator[None]:
    """A checkpoint or final model that cannot be written (a full disk, a read-only one) stops the run with one line
    (what, why, the space left) naming the latest complete checkpoint in `root`, which the failed save left intact.
    With `remove_partial`, a `target` left without its COMPLETE_MARKER is removed: it is no checkpoint."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(s in str(error) for s in ("inline_container", "StreamWriter")):
            raise  # torch.save's failed write says only "[enforce fail at inline_container.cc:...] unexpected pos"
        reason = error.strerror if isinstance(error, OSError) and error.strerror else last_line(error)
        if remove_partial and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(root).free / 2**20:.0f} MB free there"
        except OSError:
            free = "free space unknown"
        complete = complete_checkpoints(root)
        then = (
            f"the latest complete checkpoint, {complete[-1]}, is intact: --resume continues from it once this is fixed"
            if complete
            else "no checkpoint is complete yet"
        )
        raise CheckpointError(f"{target}: cannot be written ({reason}; {free}): {then}") from error


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Refuse at once to start a second run in an output directory that a live run is writing to.

    The lock file names the pid and host; one left by a run that died on this host is taken over. Only the main
    process (RANK 0) holds it: the other ranks of the same run write into the same directory.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission, a read-only disk
        raise ConfigError(f"checkpoint.output_dir {str(output_dir)!r} cannot be created: {error.strerror}") from None
    lock, me = output_dir / LOCK_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "started": time.ctime()}
    for _ in range(2):
        try:
            with open(lock, "x") as handle:
                json.dump(me, handle)
            break
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == me["host"]
            if same_host and holder.get("pid") != me["pid"] and not _alive(holder.get("pid")):
                logger.warning("%s: taking over the lock of a run that is gone (pid %s)", lock, holder.get("pid"))
                lock.unlink(missing_ok=True)
                continue
            if same_host and holder.get("pid") == me["pid"]:
                # A restarted container repeats hostname and pid (often 1), but so do two containers sharing the
                # host's network: refused, as only the user can tell a dead run from a live one here.
                raise ConfigError(
                    f"{lock} names this very process (pid {me['pid']} on {me['host']}, started "
                    f"{holder.get('started')}): a restarted container? If no other run writes to {output_dir}, "
                    f"delete {lock}"
                ) from None
            raise ConfigError(
                f"{output_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, started "
                f"{holder.get('started')}): wait for it, choose another checkpoint.output_dir, or delete {lock} if "
                "that run is gone"
            ) from None
        except OSError as error:  # a full or read-only disk: an empty lock file would refuse every later run
            with contextlib.suppress(OSError):
                lock.unlink(missing_ok=True)
            raise ConfigError(f"{lock} cannot be written: {error.strerror}") from None
    else:  # the lock came back after being taken over: another run starting at this moment holds it now
        raise ConfigError(f"{output_dir}: another run is starting in it at the same time ({lock}); try again")
    try:
        yield
    finally:
        try:
            lock.unlink(missing_ok=True)
            if created and not any(output_dir.iterdir()):
                output_dir.rmdir()  # a run that stopped before writing anything leaves nothing behind
        except OSError as error:  # a disk gone read-only: the run's own error, if any, is the one to see
            logger.warning("%s cannot be removed (%s): the next run on this host takes it over", lock, error.strerror)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def training_arguments(config: dict, output_dir: str, **changes) -> TrainingArguments:
    """TrainingArguments for a loaded train.py config (`changes` override single fields)."""
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
        optim=args["optim"],
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
        log_level_replica="error",  # transformers' own warnings (a resume's changed batch size): once per machine
        disable_tqdm=not sys.stderr.isatty(),  # progress bars only on a terminal: captured logs stay lines
    )
    return TrainingArguments(**(values | changes))


class Stopped(KeyboardInterrupt):
    """SIGTERM (what a cluster scheduler sends before it kills) raised as Ctrl-C raises KeyboardInterrupt."""


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """SIGTERM raises Stopped in this process, so the lock is released (the run is resumed, maybe on another
    host) and the last words are one line. Forked DataLoader workers ignore it: the stopping main process ends
    them (a worker dying first would be the main process's error, a traceback)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # a launcher or the caller has its own handler
        return
    main_pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() == main_pid:
            raise Stopped

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
