"""The checkpoint directory PhiClipMLLM.save_pretrained writes and from_pretrained reads.

    config.json              PhiClipConfig: backbones by name or path, adapter and LoRA settings, what is stored
    adapter.safetensors      the MultimodalProjector (always; the part phase one trains)
    lora_text/, lora_vision/ peft's LoRA directories, where a backbone carries LoRA
    text_model/, vision_model/  a backbone in full, only where its name or path cannot load it again (random-init,
                             LoRA-merged, or changed by a text warm-up)
    tokenizer and preprocessor files, and chat_template.jinja

Hand-written because the model is two transformers backbones plus an adapter, not one PreTrainedModel: each part is
saved by its own library (transformers, peft, safetensors), and this file says which parts a checkpoint needs.
"""

from __future__ import annotations

import copy
import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from backbones import CheckpointError, not_on_this_machine, quiet_loading, read_config_file
from config import ADAPTER_FILE, ConfigError, PhiClipConfig, backbone_architecture, checkpoint_directory
from lora import base_model, without_lora
from quantization import dequantized, is_quantized

SUBDIRECTORIES = ("text_model", "vision_model", "lora_text", "lora_vision")  # written only where needed
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")


def save_checkpoint(model: nn.Module, directory: str | Path, merge_lora: bool = False) -> Path:
    """PhiClipMLLM.save_pretrained (see there) for `model`, a PhiClipMLLM (model.py imports this file, not back)."""
    if merge_lora:
        model.merge_lora()
    directory = Path(directory).absolute()  # "." has no name to stage beside
    staging = directory.with_name(f".{directory.name}.incomplete")  # hidden: no checkpoint-* glob finds it
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write_model_files(model, staging)
    except BaseException:  # a full disk, Ctrl-C: no half-written copy is left to fill the disk
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(directory)
    except OSError:  # it exists (other ranks may be writing Trainer's files into a checkpoint directory now)
        _replace_model_files(directory, staging)
    return directory


def _write_model_files(model: nn.Module, staging: Path) -> None:
    """Every file of the checkpoint into `staging`, config.json last."""
    from peft import PeftModel

    config = copy.deepcopy(model.config)
    for key in ("text_model", "vision_model", "tokenizer"):
        value = getattr(config, key)
        if isinstance(value, str) and Path(value).expanduser().exists():  # a local path, loadable from anywhere
            setattr(config, key, str(Path(value).expanduser().resolve()))
    for name in ("text", "vision"):
        backbone = getattr(model, f"{name}_model")
        if isinstance(backbone, PeftModel):
            with quiet_loading():
                # The base embeddings and lm_head are frozen and never resized: they belong to the backbone, not
                # here. peft's "auto" would ask the Hub for the base model's config at every save (about 20 s a
                # backbone with no network), and store all of lm_head where LoRA targets it.
                backbone.save_pretrained(staging / f"lora_{name}", save_embedding_layers=False)
        if isinstance(getattr(config, f"{name}_model"), dict) or f"{name}_model" in config.saved_backbones:
            base = base_model(backbone)
            with quiet_loading():
                base = dequantized(base) if is_quantized(base) else base  # never store quantised weights
                base.save_pretrained(staging / f"{name}_model", state_dict=without_lora(base.state_dict()))
            if f"{name}_model" not in config.saved_backbones:
                config.saved_backbones.append(f"{name}_model")
    adapter_state = {k: v.detach().contiguous() for k, v in model.vision_adapter.state_dict().items()}
    save_file(adapter_state, staging / ADAPTER_FILE)
    model.tokenizer.save_pretrained(staging)
    model.image_processor.save_pretrained(staging)
    (staging / "config.json").write_text(config.to_json_string())


def _replace_model_files(directory: Path, staging: Path) -> None:
    """Move the staged files into an existing `directory`, which keeps what else it holds. Without config.json a
    directory is not loadable, so it goes first and comes back last: no reader sees a half-replaced model."""
    replaced_model = any((directory / name).is_file() for name in ("config.json", ADAPTER_FILE))
    (directory / "config.json").unlink(missing_ok=True)
    if replaced_model:  # what belonged to the replaced model: its backbones or LoRA, evaluate.py's figures of it
        for name in {*SUBDIRECTORIES} - {entry.name for entry in staging.iterdir()}:
            shutil.rmtree(directory / name, ignore_errors=True)
        for kind, split in itertools.product(("metrics", "captions", "answers"), ("val", "train")):
            (directory / f"{kind}_{split}.json").unlink(missing_ok=True)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
        target = directory / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def _too_long(max_length: int, positions: int) -> str:
    return (
        f"model.max_length={max_length} is longer than the text model's {positions} positions "
        "(max_position_embeddings); use at most that"
    )


def load_checkpoint(
    cls: type[nn.Module],
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trainable: bool = False,
    **runtime: Any,
) -> nn.Module:
    """PhiClipMLLM.from_pretrained (see there): `cls` is PhiClipMLLM."""
    from peft import PeftModel

    path = checkpoint_directory(path)  # a file named inside a checkpoint (the seed passed .../model_checkpoint.pt)
    if not path.exists():  # not the parent instead: checkpoint-999 of a run that has no step 999
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if path.is_file():  # a file outside any checkpoint
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path}: is a pickled checkpoint ({path.suffix}); PhiClipMLLM does not unpickle files. "
                f"Load a directory written by save_pretrained (config.json + {ADAPTER_FILE})"
            )
        path = path.parent
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a PhiClipMLLM checkpoint (expected config.json and {ADAPTER_FILE})")
    if not (path / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{path}: checkpoint is incomplete, {ADAPTER_FILE} is missing")
    unknown = sorted(set(runtime) - set(PhiClipConfig.RUNTIME_KEYS))
    if unknown:
        raise ValueError(f"from_pretrained: {unknown} are not runtime settings {PhiClipConfig.RUNTIME_KEYS}")
    stored = read_config_file(path / "config.json", "PhiClipMLLM")
    recorded_tokenizer = stored.get("tokenizer") or stored.get("text_model")
    if runtime.get("tokenizer") is not None and not same_tokenizer(runtime["tokenizer"], recorded_tokenizer, path):
        raise ValueError(
            f"tokenizer={runtime['tokenizer']!r}: {path} keeps the tokenizer its embeddings were trained with "
            f"({recorded_tokenizer!r}); load without it"
        )
    if stored.get("attn_implementation") == "flex_attention":  # accepted once, since dropped; no weight depends on it
        stored["attn_implementation"] = "sdpa"
    values = stored | runtime
    try:
        config = PhiClipConfig.from_dict(values, where=str(path / "config.json"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    # A max_length the caller gives is refused, not capped as a stored one is: before any weight loads where the
    # LM's positions are known without it (inline, a local or stored directory, a known name), else after.
    text_source = str(path / "text_model") if "text_model" in config.saved_backbones else config.text_model
    positions = (backbone_architecture(text_source) or {}).get("max_position_embeddings")
    if runtime.get("max_length") and positions and runtime["max_length"] > positions:
        raise ConfigError(_too_long(runtime["max_length"], positions))
    model = cls(config, checkpoint_dir=path, dtype=dtype).requires_grad_(False)  # peft marks what its adapter trains
    if runtime.get("max_length") and runtime["max_length"] > model.config.max_length:  # capped to the LM's positions
        raise ConfigError(_too_long(runtime["max_length"], model.config.max_length))
    for name in ("text", "vision"):
        if getattr(config, f"lora_{name}"):
            lora_dir = path / f"lora_{name}"
            if not (lora_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{lora_dir}: LoRA adapter missing (config.json records lora_{name})")
            backbone = getattr(model, f"{name}_model")
            try:
                with quiet_loading():
                    backbone = PeftModel.from_pretrained(backbone, lora_dir, is_trainable=trainable)
            except (OSError, ValueError, RuntimeError, SafetensorError) as error:
                raise CheckpointError(f"{lora_dir}: the LoRA adapter cannot be loaded ({error})") from None
            setattr(model, f"{name}_model", backbone)
    model.vision_adapter.load_state_dict(_read_adapter(path / ADAPTER_FILE, model.vision_adapter))
    if trainable:
        model.vision_adapter.float().requires_grad_(True)
    model.eval()  # as transformers' from_pretrained: LoRA dropout off until a Trainer (or .train()) says otherwise
    return model.to(device) if device is not None else model


def _read_adapter(file: Path, adapter: nn.Module) -> dict:
    try:
        state = load_file(file)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{file}: cannot be read as safetensors (truncated or corrupt?): {error}") from None
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise CheckpointError(
            f"{file}: holds tensors {found}, but config.json describes an adapter of {expected} "
            "(adapter_dim or the backbones' widths differ from the run that wrote it)"
        )
    return state


def check_architecture(model_section: dict, checkpoint: Path) -> None:
    """The YAML's architecture keys must describe the checkpoint being loaded (a phase-two file copies them)."""
    try:
        stored = PhiClipConfig.from_dict(
            read_config_file(checkpoint / "config.json", "PhiClipMLLM"), where=str(checkpoint / "config.json")
        )
    except (TypeError, ValueError) as error:  # an unknown or mistyped key: the file is at fault, not the YAML
        raise CheckpointError(str(error)) from None
    tokenizer = stored.tokenizer or stored.text_model
    given = model_section.get("tokenizer")
    if given is not None and not same_tokenizer(given, tokenizer, checkpoint):  # the checkpoint loads its own copy
        raise ConfigError(
            f"model.tokenizer is {model_section['tokenizer']!r} in the config but {tokenizer!r} in "
            f"{checkpoint / 'config.json'}: a loaded model keeps the tokenizer its embeddings were trained with "
            "(delete the key, or name a directory that holds the same tokenizer)"
        )
    for key in PhiClipConfig.ARCHITECTURE_KEYS:
        if key not in model_section:
            continue
        given = wanted = model_section[key]
        found = shown = getattr(stored, key)
        if key == "vision_feature_layer" and wanted < 0:  # stored as the number of layers kept
            layers = (backbone_architecture(stored.vision_model) or {}).get("num_hidden_layers")
            if layers is None:
                continue  # the tower's depth is not known offline: nothing to compare against
            wanted, shown = layers + 1 + wanted, found - layers - 1  # compared as stored, shown as the user wrote it
        if key in ("text_model", "vision_model") and same_source(wanted, found):
            continue
        if key in ("text_model", "vision_model") and not_on_this_machine(found):
            raise ConfigError(
                f"model.{key} is {given!r} in the config but {shown!r} in {checkpoint / 'config.json'}; {shown!r} is "
                f"not on this machine (was the run moved?): if {given!r} is the same model, set {key} in that file to it"
            )
        if wanted != found:
            raise ConfigError(
                f"model.{key} is {given!r} in the config but {shown!r} in {checkpoint / 'config.json'}, the model "
                f"being loaded: a loaded model keeps its architecture (delete the key, or set it to {shown!r})"
            )


def same_source(given: Any, stored: Any) -> bool:
    """Whether a backbone or tokenizer named in a config is the one a checkpoint's config.json names: the same hub
    id or inline config, or the same local directory however spelt. Checkpoints written before 2026-11-28 store a
    local path as their YAML spelt it (`data/demo/tokenizer`), relative to the working directory, as a YAML's is;
    later ones store it absolute and resolved (symlinks followed), as train.py reads a YAML's."""
    if given == stored:
        return True
    if not (isinstance(given, str) and isinstance(stored, str)):
        return False
    given_path, stored_path = Path(given).expanduser(), Path(stored).expanduser()
    return given_path.exists() and stored_path.exists() and given_path.resolve() == stored_path.resolve()


def same_tokenizer(given: Any, stored: Any, checkpoint: Path) -> bool:
    """Whether `given` (a config's tokenizer) is the one `checkpoint` keeps: named alike (same_source), or a local
    directory with the same vocabulary and special tokens as the checkpoint's own copy. The second case is a run moved
    to another machine (its recorded directory is not there) or a local copy of a hub tokenizer."""
    if same_source(given, stored):
        return True
    if not (isinstance(given, str) and Path(given).expanduser().is_dir()):
        return False
    from transformers import AutoTokenizer

    try:
        with quiet_loading():
            mine, kept = (AutoTokenizer.from_pretrained(str(p)) for p in (Path(given).expanduser(), checkpoint))
    except Exception:  # one that does not load is not the same (a corrupt tokenizer.json raises TypeError)
        return False  # the refusal that follows names both
    return mine.get_vocab() == kept.get_vocab() and mine.all_special_tokens == kept.all_special_tokens
