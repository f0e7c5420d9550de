"""Where the pretrained parts come from: Phi-3, the CLIP vision tower, the tokenizer and the image processor.

A backbone is a hub id, a local directory, an inline config dict (random weights, the tiny demo's), or the copy a
checkpoint stores. Loading is quiet (no per-file progress bars or expected-key reports), records the hub revision
of a backbone loaded by name, and turns a broken file into an error that names it.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from config import ConfigError, PhiClipConfig, is_int
from lora import base_model
from processor import image_processor_class
from quantization import load_kwargs, quantize_built

logger = logging.getLogger(__name__)

CONTIGUOUS_VALUE_SDPA = "sdpa_contiguous_value"
# A full CLIP checkpoint (openai/clip-vit-large-patch14 is one) also holds the text tower and projections.
CLIP_NON_VISION_KEYS = (r"(^|\.)text_model\.", r"(^|\.)(text|visual)_projection\.", r"(^|\.)logit_scale$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them holds the vocabulary


class CheckpointError(ValueError):
    """A checkpoint (or backbone) that cannot be loaded; the message names the file and what is wrong with it."""


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Load or save backbones without transformers' per-file progress bars, the FutureWarning peft triggers on
    transformers 5 (`is_gradient_checkpointing`), or a load report listing a full CLIP checkpoint's text-tower
    weights as UNEXPECTED (the vision tower never needs them; missing or mismatched weights are still reported).
    """
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    ignored = CLIPVisionModel._keys_to_ignore_on_load_unexpected
    CLIPVisionModel._keys_to_ignore_on_load_unexpected = [*(ignored or []), *CLIP_NON_VISION_KEYS]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            yield
    finally:
        CLIPVisionModel._keys_to_ignore_on_load_unexpected = ignored
        if bars_were_on:
            hf_logging.enable_progress_bar()


def read_config_file(path: Path, where: str) -> dict:
    """A checkpoint's config.json as a dict, or a CheckpointError naming it."""
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable {where} config.json ({error})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def load_tokenizer(config: PhiClipConfig, checkpoint_dir: Path | None) -> PreTrainedTokenizerBase:
    """The checkpoint's own tokenizer files, else `model.tokenizer` (or the text model's)."""
    source = checkpoint_dir or config.tokenizer or config.text_model
    if checkpoint_dir is not None and not any((checkpoint_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{checkpoint_dir}: the tokenizer files are missing (expected tokenizer.json and tokenizer_config.json, "
            "which save_pretrained writes): the checkpoint is incomplete"
        )
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        where = f"{source}: the checkpoint's tokenizer" if checkpoint_dir else f"model.tokenizer {str(source)!r}"
        raise CheckpointError(f"{where} cannot be loaded ({' '.join(str(error).split())})") from None


def load_image_processor(config: PhiClipConfig, checkpoint_dir: Path | None, image_size: int) -> Any:
    """The checkpoint's preprocessor_config.json, else the vision model's, else CLIP's defaults at its size."""
    processor_class = image_processor_class()
    if checkpoint_dir is not None:
        try:
            return processor_class.from_pretrained(str(checkpoint_dir))
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{checkpoint_dir}/preprocessor_config.json: cannot be loaded ({error})") from None
    if isinstance(config.vision_model, str):
        try:
            return processor_class.from_pretrained(config.vision_model)
        except OSError:
            logger.warning(
                "%s has no preprocessor_config.json: using CLIP's defaults at %d px", config.vision_model, image_size
            )
    # An inline (random) tower, or none saved: CLIP's preprocessing at the tower's resolution.
    return processor_class(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def not_on_this_machine(source: Any) -> bool:
    """Whether a backbone or tokenizer recorded by an absolute local path has no directory there: the checkpoint that
    records it was written on another machine, or the model was moved (a hub id is never absolute)."""
    return isinstance(source, str) and Path(source).is_absolute() and not Path(source).exists()


def load_backbone(
    config: PhiClipConfig,
    name: str,
    checkpoint_dir: Path | None,
    dtype: torch.dtype | None,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The `name` ("text" / "vision") backbone: stored in the checkpoint, inline (random), local or from the hub.

    With a `device`, a random (inline) backbone is built on the meta device and initialised once, there.
    A backbone loaded by hub id records its revision (commit hash) in `config.revisions`; loading a checkpoint onto
    a different revision than it was trained on warns (the hub's files can change under the same name).
    """
    key = f"{name}_model"
    source = getattr(config, key)
    auto_class = AutoModelForCausalLM if name == "text" else CLIPVisionModel
    attn = config.attn_implementation
    quantization = load_kwargs(config.quantize, dtype) if name == "text" and config.quantize else {}
    stored = checkpoint_dir is not None and key in config.saved_backbones
    if stored:
        source = str(checkpoint_dir / key)
    if isinstance(source, dict):
        model = _build_random(key, source, dtype, attn, tokenizer, device)
        if quantization:
            with quiet_loading():
                model = quantize_built(model, dtype, attn, **quantization)
    else:
        if checkpoint_dir is not None and not stored and not_on_this_machine(source):
            raise CheckpointError(
                f"{checkpoint_dir / 'config.json'}: {key} {source!r} is not on this machine (was the run moved?): "
                f"set {key} there to where that model lies now"
            )
        try:
            with quiet_loading():
                model = auto_class.from_pretrained(source, dtype=dtype, attn_implementation=attn, **quantization)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # a truncated weight file
            where = f"{source}: the checkpoint's stored {key}" if stored else f"model.{key} {source!r}"
            raise CheckpointError(f"{where} cannot be loaded ({' '.join(str(error).split())[:500]})") from None
        if not stored:
            _check_revision(config, key, hub_revision(source))
    if name == "text" and attn == "sdpa":
        model.set_attn_implementation(attention_with_contiguous_value())
    return model


def _build_random(
    key: str,
    values: dict,
    dtype: torch.dtype | None,
    attn: str,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device | None,
) -> nn.Module:
    """An inline (random-init) backbone, the LM sized for `tokenizer`; built on the meta device given a `device`."""
    values = dict(values)
    if key == "text_model":
        # An inline LM is sized for the tokenizer it comes with.
        values.setdefault("vocab_size", len(tokenizer))
        values.setdefault("pad_token_id", tokenizer.pad_token_id)
        values.setdefault("eos_token_id", tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        values.setdefault("bos_token_id", None)
        if values["vocab_size"] < len(tokenizer):
            raise ConfigError(
                f"model.text_model.vocab_size={values['vocab_size']} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens): delete the key (an inline LM is sized for its tokenizer) or raise it"
            )
    model_config = inline_config(key, values)
    build = AutoModelForCausalLM.from_config if key == "text_model" else CLIPVisionModel._from_config
    with torch.device("meta") if device is not None else contextlib.nullcontext():
        model = build(model_config, dtype=dtype, attn_implementation=attn)
    if device is not None:
        # On the meta device transformers skips initialisation; it runs here once, on the target device (the CPU
        # path runs torch's default init and then transformers' over it, on the CPU: 164 s at real size).
        model.to_empty(device=device)
        model.init_weights()  # every parameter and buffer (RoPE inv_freq, CLIP position_ids) as from_config
    return model


def inline_config(key: str, values: dict) -> PretrainedConfig:
    """The transformers config of an inline (random-init) backbone; a bad value is a ConfigError naming it."""
    expected = {"text_model": "a causal LM such as phi3", "vision_model": "clip_vision_model"}[key]
    try:
        config = AutoConfig.for_model(**values)
    except Exception as error:  # transformers' strict config validation raises its own classes (not ValueError)
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(f"model.{key}: not a valid {values.get('model_type')!r} config ({reason})") from None
    wanted = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if key == "text_model" else {"clip_vision_model": None}
    if config.model_type not in wanted:
        raise ConfigError(f"model.{key}.model_type is {config.model_type!r}; expected {expected}")
    misspelt = _misspelt_keys(type(config), values)
    if misspelt:
        written, meant = next(iter(misspelt.items()))
        raise ConfigError(f"model.{key}.{written}: not a {config.model_type} config key; did you mean {meant}?")
    heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if heads and width and width % heads and "head_dim" not in values:  # else the heads' width is derived from it
        raise ConfigError(f"model.{key}: hidden_size {width} is not a multiple of num_attention_heads {heads}")
    patch, side = getattr(config, "patch_size", None), getattr(config, "image_size", None)
    if is_int(patch) and is_int(side) and not 0 < patch <= side:  # else the first convolution fails mid-run
        raise ConfigError(f"model.{key}: patch_size {patch} must be positive and at most image_size {side}")
    return config


def _misspelt_keys(config_class: type, values: dict) -> dict[str, str]:
    """Keys that are a near miss of one the config class knows (`hiden_size`), each with the key it resembles.

    transformers' configs take any key and store it, so a typo would silently build the default size (3072 wide for
    Phi-3). Unknown keys are not errors by themselves: a pasted config.json holds keys older or newer versions know
    (`rope_theta`, `torch_dtype`, CLIP's generation defaults). Only a close match to a known key that is not also
    given counts as a typo.
    """
    known = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters)
    known |= set(getattr(config_class, "attribute_map", {}))
    misspelt = {}
    for written in sorted(values.keys() - known):
        close = difflib.get_close_matches(written, known - values.keys(), n=1, cutoff=0.8)
        if close:
            misspelt[written] = close[0]
    return misspelt


def quantize_language_model(language_model: nn.Module, mode: str, dtype: torch.dtype | None, attn: str) -> nn.Module:
    """A plain LM in memory (merged LoRA) quantised as `model.quantize: mode` loads one."""
    with quiet_loading():
        quantized = quantize_built(language_model, dtype, attn, **load_kwargs(mode, dtype))
    if attn == "sdpa":
        quantized.set_attn_implementation(attention_with_contiguous_value())
    return quantized


def hub_revision(source: str) -> str | None:
    """The commit a hub id resolves to now (from the local hub cache when offline); None for a local path."""
    if Path(source).expanduser().exists():
        return None
    from transformers.utils.hub import cached_file, extract_commit_hash

    try:
        return extract_commit_hash(cached_file(source, "config.json"), None)
    except (OSError, ValueError):
        return None


def _check_revision(config: PhiClipConfig, key: str, revision: str | None) -> None:
    recorded = config.revisions.get(key)
    if revision and recorded and revision != recorded:
        logger.warning(
            "%s is now revision %s, but this checkpoint was trained on revision %s: outputs may differ "
            "(download that revision and load it by path to reproduce exactly)",
            getattr(config, key),
            revision[:12],
            recorded[:12],
        )
    if revision:
        config.revisions[key] = revision


def attention_with_contiguous_value() -> str:
    """Register (once) SDPA attention that is handed a contiguous copy of `value`; returns its name.

    Phi-3 slices q, k and v out of one fused qkv_proj output. RoPE turns q and k into new tensors, but v stays a
    view, so the v that SDPA saves for backward pins the whole fused output (3 hidden-size values per token and
    layer instead of 1). transformers has no switch for this, so it is written here; outputs are bit-identical.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if CONTIGUOUS_VALUE_SDPA not in AttentionInterface._global_mapping:

        def attention(module, query, key, value, *args, **kwargs):
            return sdpa_attention_forward(module, query, key, value.contiguous(), *args, **kwargs)

        AttentionInterface.register(CONTIGUOUS_VALUE_SDPA, attention)
        AttentionMaskInterface.register(CONTIGUOUS_VALUE_SDPA, sdpa_mask)
    return CONTIGUOUS_VALUE_SDPA


def use_liger_kernels(language_model: nn.Module) -> None:
    """Run the LM's RMSNorm, SwiGLU and RoPE as liger-kernel's fused Triton kernels (training_args.use_liger_kernel).

    transformers' Trainer applies liger only to a PreTrainedModel (ours is not one) and with liger's fused
    cross-entropy, which would replace the LM's forward; ours computes logits at the supervised positions only. So
    the LM is patched here, without cross-entropy. liger patches this instance's modules and also the LM's
    modeling module (every model of that type built later in this process). RoPE stays unfused for a partial rotary
    dimension (Phi-4-mini's 0.75): liger's kernel rotates the whole head. Raises ConfigError without a CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise ConfigError("training_args.use_liger_kernel=true: liger-kernel's Triton kernels need a CUDA GPU")
    from liger_kernel.transformers import monkey_patch  # the per-model patch functions, by model type

    base = base_model(language_model)
    model_type = base.config.model_type
    if model_type not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"training_args.use_liger_kernel=true: liger-kernel has no kernels for {model_type} models")
    full_rotary = (getattr(base.config, "partial_rotary_factor", None) or 1.0) == 1.0
    kernels = dict(rope=full_rotary, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    monkey_patch._apply_liger_kernel_to_instance(model=base, **kernels)
    logger.info(
        "liger-kernel on the %s language model: %s", model_type, ", ".join(k for k, on in kernels.items() if on)
    )
