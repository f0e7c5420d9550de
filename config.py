"""What every command shares, at the bottom of the house: PhiClipConfig (a model's config.json), the published
backbone architectures, ConfigError, the one-line `error:` command line, and the optional-package checks.

The training YAML is training_config.py's. A bad value is a ConfigError naming the key, the value and what was
expected. This module imports neither torch nor any project module, so `--help` and config errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

IMAGE_TOKEN = "<|placeholder1|>"  # where an image goes in a prompt (Phi-3's spare special token)
PROMPT_FORMATS = ("chat", "seed")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZE_MODES = ("8bit", "4bit")  # model.quantize: bitsandbytes LLM.int8, or NF4 with double quantisation
# Not flex_attention: PyTorch's FlexAttention has no backward on the CPU and its CPU decoding fails to compile
# (torch 2.13), so no test here could show it trains or generates correctly.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
# The published architectures (their config.json values), for checks and dry runs that must not need the hub.
KNOWN_ARCHITECTURES = {
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3",
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
    ),
    "openai/clip-vit-large-patch14": dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
    ),
}


class ConfigError(ValueError):
    """A config that cannot be used; raised before any model or data is loaded."""


# ------------------------------------------------------------------------------------------- model config
@dataclass
class PhiClipConfig:
    """Everything needed to rebuild a PhiClipMLLM; saved as config.json in each checkpoint directory.

    `text_model` / `vision_model` are a hub id or local path, or a dict of model-config values with `model_type`
    (`phi3`, `clip_vision_model`) for a randomly initialised backbone.
    """

    text_model: str | dict = "microsoft/Phi-3-mini-4k-instruct"
    vision_model: str | dict = "openai/clip-vit-large-patch14"
    tokenizer: str | None = None  # defaults to text_model when that is a name/path
    adapter_dim: int | None = 1024  # hidden width of the MLP adapter; None = a single linear layer
    adapter_activation: str = "gelu"
    normalize: bool = True  # L2-normalise projected image embeddings, as the seed did
    vision_feature_layer: int = -1  # hidden_states index: -1 = last layer (seed), -2 = LLaVA's choice
    keep_cls: bool = True  # the seed keeps CLS (257 tokens for CLIP-L/14 at 224 px), LLaVA drops it (256)
    prompt_format: str = "chat"  # "chat" (Phi-3 chat template) or "seed" (the original raw text)
    max_length: int | None = None  # tokens per sample, image tokens included; None: 1024 or the LM's positions
    attn_implementation: str = "sdpa"
    quantize: str | None = None  # "8bit" / "4bit": the LM is loaded quantised by bitsandbytes (QLoRA in phase two)
    lora_text: dict | None = None  # the peft LoRA settings applied, recorded by setup_lora
    lora_vision: dict | None = None
    saved_backbones: list[str] = field(default_factory=list)  # backbones stored in full inside the checkpoint
    revisions: dict = field(default_factory=dict)  # hub commit of each backbone loaded by name, recorded on load

    def __post_init__(self) -> None:
        for key in ("text_model", "vision_model"):
            value = getattr(self, key)
            if isinstance(value, dict):
                if "model_type" not in value:
                    raise ValueError(f"model.{key}: an inline config needs a 'model_type' key, got {sorted(value)}")
            elif not isinstance(value, str) or not value:
                raise ValueError(f"model.{key}: expected a hub id, a local path or a config dict, got {value!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"model.prompt_format: expected one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.adapter_dim is not None and (not is_int(self.adapter_dim) or self.adapter_dim <= 0):
            raise ValueError(f"model.adapter_dim: expected a positive integer or null, got {self.adapter_dim!r}")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length <= 0):
            raise ValueError(f"model.max_length: expected a positive integer or null, got {self.max_length!r}")
        if not is_int(self.vision_feature_layer) or self.vision_feature_layer == 0:
            raise ValueError(
                f"model.vision_feature_layer: expected a non-zero integer (-1 = last layer), "
                f"got {self.vision_feature_layer!r}"
            )
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attn_implementation: expected one of {ATTENTION_IMPLEMENTATIONS}, "
                f"got {self.attn_implementation!r}"
            )
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"model.quantize: expected null or one of {QUANTIZE_MODES}, got {self.quantize!r}")
        for key in ("normalize", "keep_cls"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.{key}: expected true or false, got {getattr(self, key)!r}")
        from transformers.activations import ACT2FN  # imports torch: only once a model config is really read

        if self.adapter_activation not in ACT2FN:
            raise ValueError(
                f"model.adapter_activation: unknown activation {self.adapter_activation!r}; "
                f"e.g. gelu, relu, silu, quick_gelu"
            )

    @classmethod
    def from_dict(cls, values: dict, where: str = "model") -> PhiClipConfig:
        """Build from a dict, rejecting unknown keys with a message that lists the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {valid}")
        if where == "model":  # the YAML's section: the messages already name model.KEY
            return cls(**values)
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:  # a checkpoint's config.json: name the file too
            raise type(error)(f"{where}: {error}") from None

    def to_dict(self) -> dict:
        """The settings as plain values (what config.json stores)."""
        return dataclasses.asdict(self)

    # What a checkpoint's weights depend on, and what may change when it is loaded again (phase two, resume).
    ARCHITECTURE_KEYS = (
        "text_model",
        "vision_model",
        "adapter_dim",
        "adapter_activation",
        "normalize",
        "vision_feature_layer",
        "keep_cls",
    )
    RUNTIME_KEYS = ("max_length", "attn_implementation", "prompt_format", "tokenizer", "quantize")

    def to_json_string(self) -> str:
        """config.json's text (transformers' logging integrations read a model's config this way)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML's `true` is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def feature_layers_used(layer: int, total_layers: int) -> int:
    """How many vision layers `model.vision_feature_layer` keeps (-1: all); ValueError when it is outside the tower."""
    # hidden_states has total_layers + 1 entries (the embeddings first): index k is the output of k layers.
    used = layer if layer >= 0 else total_layers + 1 + layer
    if not 1 <= used <= total_layers:
        raise ValueError(
            f"model.vision_feature_layer={layer} is outside the vision model's {total_layers} layers "
            f"(use 1..{total_layers} or -1..-{total_layers})"
        )
    return used


def backbone_architecture(source: str | dict) -> dict | None:
    """A backbone's config values without the hub: inline, a local directory's config.json, or a known name."""
    if isinstance(source, dict):
        return dict(source)
    local = Path(source).expanduser() / "config.json"
    if local.is_file():
        values = json.loads(local.read_text())
        return values.get("vision_config", values) if values.get("model_type") == "clip" else values
    return dict(KNOWN_ARCHITECTURES[source]) if source in KNOWN_ARCHITECTURES else None


def installed(module: str) -> bool:
    """Whether an optional package can be imported, without importing it (or torch)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # sys.modules holds None for it: imports of it are blocked
        return False


def bitsandbytes_installed() -> bool:
    """Whether bitsandbytes (the optional `quantize` extra) can be imported."""
    return installed("bitsandbytes")


def require_bitsandbytes(what: str) -> None:
    """Raise a one-line ConfigError naming `what` when bitsandbytes is not installed."""
    if not bitsandbytes_installed():
        raise ConfigError(
            f"{what} needs bitsandbytes, which is not installed: pip install -e '.[quantize]' (or pip install bitsandbytes)"
        )


def torch_dtype(name: str) -> Any:
    """The torch dtype a config's `dtype` names."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class CommandLine(argparse.ArgumentParser):
    """argparse whose bad-argument message is one `error:` line and exit status 2, like every other input error."""

    def error(self, message: str) -> NoReturn:
        """argparse's hook for a bad argument."""
        fail(f"{message} (see {self.prog} --help)")


COMPLETE_MARKER = "checkpoint_complete"  # written last (trainer.py): a checkpoint directory without it is ignored
ADAPTER_FILE = "adapter.safetensors"  # the projector (checkpoint.py); named here for the checks that load no torch
RUN_RECORD = "train_config.yaml"  # the config a training output was made with (run_record.py)


def checkpoint_step(path: Path) -> int | None:
    """N of a Trainer checkpoint directory named `checkpoint-N`; None for any other name."""
    # "checkpoint-N": transformers' PREFIX_CHECKPOINT_DIR, spelt out here because this module imports no torch.
    return int(path.name.removeprefix("checkpoint-")) if re.fullmatch(r"checkpoint-\d+", path.name) else None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories under output_dir that were fully written, oldest step first."""
    found = {
        checkpoint_step(p): p
        for p in Path(output_dir).glob("checkpoint-*")
        if checkpoint_step(p) is not None and (p / COMPLETE_MARKER).is_file()
    }
    return [found[step] for step in sorted(found)]


def checkpoint_directory(path: str | Path) -> Path:
    """`path`, or the checkpoint directory holding the file it names (the original passed .../model_checkpoint.pt)."""
    path = Path(path).expanduser()
    return path.parent if path.suffix and not path.is_dir() and (path.parent / "config.json").is_file() else path


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a PhiClipMLLM checkpoint directory (or a file inside one); None when it is one."""
    directory = checkpoint_directory(path)
    if not directory.exists():
        return "no such directory"
    directory = directory.parent if directory.is_file() else directory
    if (directory / "config.json").is_file():  # loading names any file that is missing or broken
        return None
    complete = complete_checkpoints(directory)
    if complete:  # train.py's output directory of a run that stopped before writing its final model
        return (
            f"holds no final model, only checkpoints of an unfinished run (the last: {complete[-1].name}): finish "
            f"it with train.py --resume, or give {complete[-1]}"
        )
    return "not a PhiClipMLLM checkpoint (no config.json); give train.py's output"


def shown_path(path: str | Path) -> str:
    """`path` quoted for a message, a relative one with the absolute path it names: a config's paths are read from
    the working directory (not the config file's), and a run started elsewhere otherwise reads as a missing file."""
    given = Path(path).expanduser()
    return repr(str(path)) if given.is_absolute() else f"{str(path)!r} (from the working directory: {given.absolute()})"


def last_line(error: Exception) -> str:
    """An error's message without the traceback a DataLoader worker's error carries in it."""
    # A worker's error arrives wrapped, its message ending in the worker's traceback, whose last line is
    # `module.Class: message`.
    line = str(error).strip().splitlines()[-1]
    prefix = f"{type(error).__module__}.{type(error).__qualname__}: "
    return line.removeprefix(prefix).removeprefix(f"{type(error).__qualname__}: ")


@contextlib.contextmanager
def same_in_every_process() -> Iterator[None]:
    """Marks an error raised inside as one that every process of a torchrun / accelerate launch run meets alike
    (the same command line, config and files), so train.py reports it from one process per machine, not per GPU."""
    try:
        yield
    except Exception as error:
        error.same_in_every_process = True
        raise


def fail(message: str) -> NoReturn:
    """Report bad input as one line on stderr and exit with status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
