"""What a training output records about its run: train_config.yaml, the config as the run read it, in every
checkpoint and the final model, so that the output directory alone says how to train it again; and what a resume
checks against a checkpoint (its step, global batch and seed) before any weight loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from packaging.version import Version
from transformers import __version__ as TRANSFORMERS_VERSION

from config import COMPLETE_MARKER, RUN_RECORD, ConfigError, checkpoint_step
from trainer import batch_shape

logger = logging.getLogger("train")

# What a record names the versions of: the libraries whose changes change the numbers.
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "pillow")


def describe_run(
    config: dict, phase: str, resumed_from: str | os.PathLike | None = None, training_samples: int | None = None
) -> str:
    """The config as this run read it (defaults filled in, --set applied) as YAML that train.py reads back, headed
    by what else a rerun needs: the phase, the working directory relative paths start from, the library versions
    (and the size of the training set, which a resume compares)."""
    from importlib.metadata import PackageNotFoundError, version

    def version_of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    # phase_one / phase_two are the original's spelling of data.train, which holds them now (both: an error)
    values = {k: v for k, v in config.items() if k not in ("path", "phase_one", "phase_two")}
    versions = f"# python {sys.version.split()[0]}, " + ", ".join(f"{p} {version_of(p)}" for p in PACKAGES)
    lines = [
        f"# The config of a phase-{phase} run of train.py, read from {config['path']} with defaults filled in.",
        f"# Rerun: python train.py{' --phase_one' if phase == 'one' else ''} --config <this file> "
        "--set checkpoint.output_dir=<a new directory>",
        f"# Relative paths start from {os.getcwd()}.",
        *(_resume_lines(Path(resumed_from), values, versions) if resumed_from else []),
        *([f"# Training samples: {training_samples}."] if training_samples is not None else []),
        versions,
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _resume_lines(checkpoint: Path, values: dict, versions: str) -> list[str]:
    """Every resume point of the run, the earlier ones from the checkpoint's own record, each with what it changed
    (config values, library versions): the record above them holds the last part's config only."""
    try:
        before = (checkpoint / RUN_RECORD).read_text(encoding="utf-8")
        earlier_values = yaml.safe_load(before)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # a checkpoint older than records, or one edited by hand
        before, earlier_values = "", None
    earlier = re.findall(r"^# Resumed from .*$", before, re.MULTILINE)
    changed = []
    if isinstance(earlier_values, dict):
        old, new = dict(_flat(earlier_values)), dict(_flat(values))
        changed = [
            f"{key} {_shown(old.get(key))} -> {_shown(new.get(key))}"
            for key in old | new
            if old.get(key) != new.get(key)
        ]
    old_versions = re.search(r"^# python .*$", before, re.MULTILINE)
    if old_versions:
        was = dict(item.partition(" ")[::2] for item in old_versions[0].removeprefix("# ").split(", "))
        now = dict(item.partition(" ")[::2] for item in versions.removeprefix("# ").split(", "))
        changed += [f"{name} {was[name]} -> {now[name]}" for name in now if was.get(name, now[name]) != now[name]]
    note = f" (changed: {', '.join(changed)})" if changed else ""
    return [*earlier, f"# Resumed from {checkpoint}{note}."]


def _flat(values: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A nested config as (dotted key, value) pairs, as --set names them."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _shown(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_resume_point(resume_dir: Path, complete: list[Path], now: dict[str, int], seed: int, phase: str) -> None:
    """Refuse a resume that would lose checkpoints or not continue where the run stopped: later checkpoints in its
    directory, another global batch (`now`, from trainer.batch_shape), another seed or another phase."""
    # The phase first: another phase's checkpoint differs in more than its batch or later checkpoints.
    recorded = recorded_run(resume_dir)
    if recorded.get("phase", phase) != phase:  # e.g. a phase-one output directory given to phase two's --resume
        hint = (
            "to continue it, drop --phase_one and give its phase-two config"
            if phase == "one"
            else "to continue it, add --phase_one and give its phase-one config; to start phase two from a "
            "phase-one model, give its output directory as checkpoint.load_dir, without --resume"
        )
        raise ConfigError(
            f"--resume {resume_dir}: that checkpoint is of a phase-{recorded['phase']} run "
            f"({resume_dir / RUN_RECORD}), this run is phase {phase}: a run resumes in its own phase ({hint})"
        )
    step = checkpoint_step(resume_dir)
    later = [p.name for p in complete if step is not None and checkpoint_step(p) > step]
    if later:  # rotation keeps the highest steps: the resumed run's own checkpoints would be deleted as written
        raise ConfigError(
            f"--resume {resume_dir}: the output directory also holds later checkpoints ({', '.join(later)}); "
            f"move them aside to go back to step {step}, or resume the latest"
        )
    saved = saved_batch_shape(resume_dir)
    if saved and math.prod(saved.values()) != math.prod(now.values()):

        def describe(shape: dict) -> str:
            return f"{math.prod(shape.values())} ({' x '.join(str(v) for v in shape.values())})"

        raise ConfigError(
            f"--resume {resume_dir}: that run's global batch was {describe(saved)}, this one's is {describe(now)} "
            "(processes x batch_size x gradient_accumulation_steps): its data position and learning-rate schedule "
            "would not continue where it stopped; keep the global batch"
        )
    if saved and saved["batch_size"] != now["batch_size"] and Version(TRANSFORMERS_VERSION) < Version("5.2"):
        # Their Trainer reads the per-device batch size back from trainer_state.json on every resume, so the
        # config's would be ignored and the global batch change after all (2 x 4 resumed as 1 x 4, not 1 x 8).
        raise ConfigError(
            f"--resume {resume_dir}: transformers {TRANSFORMERS_VERSION} resumes with the checkpoint's batch_size "
            f"({saved['batch_size']}), not this config's ({now['batch_size']}): keep batch_size "
            f"{saved['batch_size']} and change gradient_accumulation_steps, or use transformers 5.2 or later"
        )
    if saved and saved != now:
        logger.info(
            "resuming with %s instead of %s: the same global batch, each process's RNG starts afresh", now, saved
        )
    # Another seed: the rest of the epoch would be drawn from another permutation (samples repeated and others never
    # seen), and the captions and instructions drawn anew.
    if recorded.get("seed", seed) != seed:
        raise ConfigError(
            f"--resume {resume_dir}: that run's seed was {recorded['seed']} ({resume_dir / RUN_RECORD}), this one's "
            f"is {seed}: its data order and caption draws would not continue where it stopped; keep the seed"
        )


def saved_batch_shape(checkpoint: Path) -> dict[str, int] | None:
    """The batch shape recorded in a checkpoint's marker (None for a checkpoint written before it was recorded)."""
    try:
        recorded = json.loads((checkpoint / COMPLETE_MARKER).read_text())
        return {k: int(recorded[k]) for k in batch_shape(0, 0, 0)}
    except (OSError, ValueError, TypeError, KeyError):  # a legacy "N" marker, or one edited by hand
        return None


def check_training_set(resume_dir: Path, samples: int) -> None:
    """Warn when the training set a resume draws from is not the size the checkpoint's run had: its data files
    changed, so the rest of the epoch follows another order (a fixed record or two may be the point, so no error)."""
    before = recorded_run(resume_dir).get("samples")
    if before is not None and before != samples:
        logger.warning(
            "--resume %s: that run's training set had %d samples, this one has %d (its data or data settings changed): "
            "the rest of the epoch is drawn in another order, so some samples repeat and others are missed",
            resume_dir,
            before,
            samples,
        )


def recorded_run(checkpoint: Path) -> dict[str, Any]:
    """What a checkpoint's record says of its run: "phase", "seed", "samples", each where it says. A checkpoint
    without a record (written before records were kept) says nothing, and is not checked; one whose YAML was broken
    by hand still says what its header lines say."""
    try:
        text = (checkpoint / RUN_RECORD).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        values = None
    found = {}
    if phase := re.search(r"^# The config of a phase-(one|two) run", text, re.MULTILINE):
        found["phase"] = phase[1]
    if samples := re.search(r"^# Training samples: (\d+)\.$", text, re.MULTILINE):
        found["samples"] = int(samples[1])
    if isinstance(values, dict) and isinstance(values.get("seed"), int):
        found["seed"] = values["seed"]
    return found
