"""What a training output records about its run: train_config.yaml, the config as the run read it, in every
checkpoint and the final model, so that the output directory alone says how to train it again; and what a resume
checks against it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from config import ConfigError

RUN_RECORD = "train_config.yaml"

# What a record names the versions of: the libraries whose changes change the numbers.
PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy", "pillow")


def describe_run(config: dict, phase: str, resumed_from: str | os.PathLike | None = None) -> str:
    """The config as this run read it (defaults filled in, --set applied) as YAML that train.py reads back, headed
    by what else a rerun needs: the phase, the working directory relative paths start from, the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    # phase_one / phase_two are the original's spelling of data.train, which holds them now (both: an error)
    values = {k: v for k, v in config.items() if k not in ("path", "phase_one", "phase_two")}
    lines = [
        f"# The config of a phase-{phase} run of train.py, read from {config['path']} with defaults filled in.",
        f"# Rerun: python train.py{' --phase_one' if phase == 'one' else ''} --config <this file> "
        "--set checkpoint.output_dir=<a new directory>",
        f"# Relative paths start from {os.getcwd()}.",
        *([f"# Resumed from {resumed_from}."] if resumed_from else []),
        f"# python {sys.version.split()[0]}, " + ", ".join(f"{p} {installed(p)}" for p in PACKAGES),
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def check_resumed_seed(checkpoint: Path, seed: int) -> None:
    """Refuse to resume `checkpoint` with another seed: the rest of its epoch would be drawn from another
    permutation (samples repeated and others never seen), and the captions and instructions drawn anew. A checkpoint
    without a readable record (written before records were kept, or edited) is not checked."""
    try:
        recorded = yaml.safe_load((checkpoint / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    if isinstance(recorded, dict) and isinstance(recorded.get("seed"), int) and recorded["seed"] != seed:
        raise ConfigError(
            f"--resume {checkpoint}: that run's seed was {recorded['seed']} ({checkpoint / RUN_RECORD}), this one's "
            f"is {seed}: its data order and caption draws would not continue where it stopped; keep the seed"
        )
