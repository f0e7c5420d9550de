"""PhiClipMLLM: a CLIP vision tower, an MLP adapter and Phi-3; its phases and generate() (checkpoint.py: its files).

An image takes one path, in training and in generation:
    PhiClipProcessor: prompt format -> tokens, each <|placeholder1|> expanded to `num_image_tokens` ids, labels
    PhiClipMLLM.forward: CLIP (stopped at the feature layer) -> adapter -> masked_scatter into text embeddings -> LM
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput

from backbones import (
    CONTIGUOUS_VALUE_SDPA,
    CheckpointError,
    load_backbone,
    load_image_processor,
    load_tokenizer,
    quiet_loading,
)
from checkpoint import load_checkpoint, save_checkpoint
from config import ConfigError, PhiClipConfig, feature_layers_used
from lora import base_model, check_lora_targets, lora_shape
from processor import IMAGE_TOKEN, PhiClipProcessor, image_processor_class
from quantization import dequantized, is_quantized, logical_numel

logger = logging.getLogger(__name__)

__all__ = [
    "CONTIGUOUS_VALUE_SDPA",
    "IMAGE_TOKEN",
    "CheckpointError",
    "MultimodalProjector",
    "PhiClipConfig",
    "PhiClipMLLM",
    "PhiClipProcessor",
    "generate",
    "image_processor_class",
    "quiet_loading",
]

DEFAULT_MAX_LENGTH = 1024  # model.max_length when not given (or the LM's max_position_embeddings, when fewer)


@dataclass
class PhiClipOutput(ModelOutput):
    """`logits` are (batch, seq, vocab) without labels; with labels only the supervised positions' (n, vocab)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class MultimodalProjector(nn.Module):
    """Maps CLIP patch embeddings into the LM's embedding space: Linear -> act -> Linear (or one Linear)."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        hidden_dim: int | None = 1024,
        activation: str = "gelu",
        normalize: bool = True,
    ):
        super().__init__()
        if hidden_dim is None:
            self.layers = nn.Sequential(nn.Linear(vision_dim, text_dim))
        else:
            self.layers = nn.Sequential(
                nn.Linear(vision_dim, hidden_dim), ACT2FN[activation], nn.Linear(hidden_dim, text_dim)
            )
        self.normalize = normalize

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(..., vision_dim) -> (..., text_dim), unit length per token when `normalize`."""
        projected = self.layers(image_features)
        return F.normalize(projected, dim=-1) if self.normalize else projected


class PhiClipMLLM(nn.Module):
    """CLIP vision tower -> MultimodalProjector -> Phi-3, with image embeddings scattered over placeholder ids."""

    accepts_loss_kwargs = True  # tells HF Trainer to pass num_items_in_batch (exact loss under grad accumulation)

    def __init__(
        self,
        config: PhiClipConfig,
        checkpoint_dir: str | Path | None = None,
        dtype: torch.dtype | None = None,
        tokenizer: Any = None,
        image_processor: Any = None,
        device: str | torch.device | None = None,
    ):
        """`device`: where the model is built. Given one, a random (inline) backbone is built on the meta device and
        initialised there, once (a real-size Phi-3 takes seconds on a GPU instead of minutes on the CPU)."""
        super().__init__()
        self.config = config = copy.deepcopy(config)
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.tokenizer = tokenizer or load_tokenizer(config, ckpt)
        self.text_model = load_backbone(config, "text", ckpt, dtype, self.tokenizer, device)
        positions = getattr(self.text_model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        if config.max_length is None:
            config.max_length = min(DEFAULT_MAX_LENGTH, positions)
        elif config.max_length > positions:  # past them RoPE extrapolates: quality falls, no error
            too_long = f"model.max_length={config.max_length} is longer than the text model's {positions} positions"
            if ckpt is None:
                raise ConfigError(f"{too_long} (max_position_embeddings); use at most that")
            # A checkpoint saved before this check existed (or edited by hand): load it, capped, not refused.
            logger.warning("%s: %s; using %d", ckpt / "config.json", too_long, positions)
            config.max_length = positions
        vision_model = load_backbone(config, "vision", ckpt, dtype, self.tokenizer, device)
        vision_config = vision_model.config
        # Stop the tower at the feature layer: layers past it would cost compute and memory for nothing.
        encoder = getattr(vision_model, "vision_model", vision_model).encoder  # older transformers nest it
        used_layers = feature_layers_used(config.vision_feature_layer, len(encoder.layers))
        config.vision_feature_layer = used_layers  # non-negative from here on, so truncation is idempotent
        encoder.layers = encoder.layers[:used_layers]
        vision_config.num_hidden_layers = used_layers
        self.vision_model = vision_model
        self.vision_adapter = MultimodalProjector(
            vision_config.hidden_size,
            self.text_model.config.hidden_size,
            config.adapter_dim,
            config.adapter_activation,
            config.normalize,
        )
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        self.num_image_tokens = patches + (1 if config.keep_cls else 0)
        if image_processor is None:
            image_processor = load_image_processor(config, ckpt, vision_config.image_size)
        self.processor = PhiClipProcessor(
            self.tokenizer, image_processor, self.num_image_tokens, config.prompt_format, config.max_length
        )
        self.image_token_id = self.processor.image_token_id
        if config.quantize:  # bitsandbytes put the LM on its device (quantisation happens there): keep all together
            self.to(self.text_model.get_input_embeddings().weight.device)
        elif device is not None:
            self.to(device)

    @property
    def image_processor(self) -> Any:
        """The CLIP image processor (resize, crop, normalise) the processor feeds pixel values through."""
        return self.processor.image_processor

    # ----------------------------------------------------------------------------------------------- forward
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, H, W) -> (n_images, num_image_tokens, text hidden size)."""
        vision_dtype = next(self.vision_model.parameters()).dtype
        # A frozen tower needs no graph; with LoRA on it, gradients must flow (LLaVA's no_grad would block them).
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_model.parameters())
        with torch.set_grad_enabled(needs_grad):
            features = self.vision_model(pixel_values=pixel_values.to(vision_dtype)).last_hidden_state
        if not self.config.keep_cls:
            features = features[:, 1:]
        adapter_dtype = next(self.vision_adapter.parameters()).dtype
        return self.vision_adapter(features.to(adapter_dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings with each image's embeddings written over its placeholder positions."""
        embeddings = self.text_model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.image_token_id
        n_slots, n_images = int(image_mask.sum()), 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.num_image_tokens:
            raise ValueError(
                f"{n_slots} image-token positions ({n_slots / self.num_image_tokens:g} placeholders of "
                f"{self.num_image_tokens}) but {n_images} images; use the model's processor to build inputs"
            )
        if n_images:
            image_embeddings = self.encode_images(pixel_values).to(embeddings.dtype)
            embeddings = embeddings.masked_scatter(image_mask.unsqueeze(-1), image_embeddings)
        return embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> PhiClipOutput:
        """Logits for every position, or (with labels) the mean loss over supervised positions only."""
        embeddings = self.embed(input_ids, pixel_values)
        if position_ids is None and attention_mask is not None:
            # Positions count real tokens only, so a left-padded sample sees the positions it would see alone.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.text_model.get_decoder()(
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        lm_head = self.text_model.get_output_embeddings()
        if labels is None:
            return PhiClipOutput(logits=lm_head(hidden))
        # Project only the supervised positions: full-vocabulary logits for the image and prompt would be waste.
        targets = labels[:, 1:]
        supervised = targets != -100
        logits = lm_head(hidden[:, :-1][supervised]).float()
        loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        if pixel_values is None and self.training:
            # A text-only batch never reaches the vision side, yet its trainable weights must be in the graph:
            # phase one's loss would need no gradient at all, and DDP waits for every rank's gradient of each
            # trainable weight. Zero times their sum adds exact zero gradients and changes nothing else.
            vision_side = (*self.vision_model.parameters(), *self.vision_adapter.parameters())
            unused = [p for p in vision_side if p.requires_grad]
            if unused:
                loss = loss + 0.0 * sum(p.sum() for p in unused)
        denominator = num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp(min=1)
        return PhiClipOutput(loss=loss / denominator, logits=logits)

    # ------------------------------------------------------------------------------------------------ phases
    def prime_model(self, phase: str = "one") -> PhiClipMLLM:
        """Phase one: freeze both backbones, train the adapter (kept in fp32 for mixed precision)."""
        if phase != "one":
            raise ValueError(f"prime_model: phase must be 'one' (phase two is setup_lora), got {phase!r}")
        self.requires_grad_(False)
        self.vision_adapter.float().requires_grad_(True)
        return self

    def setup_lora(self, text_lora: dict | None = None, vision_lora: dict | None = None) -> PhiClipMLLM:
        """Phase two: add peft LoRA to the backbones; train LoRA + adapter, freeze everything else.

        A backbone that already carries LoRA (a phase-two checkpoint loaded to train on) keeps training it; its
        settings must then match. `merge_lora()` first to fold it into the backbone and start a fresh LoRA.
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        for module in (self.text_model, self.vision_model, self.vision_adapter):
            if not isinstance(module, PeftModel):  # a loaded LoRA keeps what peft marked trainable at load
                module.requires_grad_(False)  # (LoRA, and biases or modules_to_save where so configured)
        for name, settings in (("text", text_lora), ("vision", vision_lora)):
            backbone, recorded = getattr(self, f"{name}_model"), getattr(self.config, f"lora_{name}")
            if isinstance(backbone, PeftModel):
                if not settings or lora_shape(settings) != lora_shape(recorded):
                    raise ValueError(
                        f"peft_{name}: the loaded model already has LoRA {lora_shape(recorded)}, which phase two "
                        f"continues, but the config asks for {lora_shape(settings) if settings else 'none'}; give "
                        "the same settings, or set checkpoint.loaded_lora: merge to merge the loaded LoRA into the "
                        "backbone (and add a fresh one where asked)"
                    )
                if not any(p.requires_grad for p in backbone.parameters()):
                    raise ValueError(
                        f"the loaded LoRA on the {name} model is frozen: load the checkpoint with "
                        "PhiClipMLLM.from_pretrained(..., trainable=True) to train it on"
                    )
                logger.info("LoRA on the %s model: continuing the loaded adapter %s", name, lora_shape(recorded))
                continue
            if not settings:
                continue
            settings = dict(settings)
            matched = check_lora_targets(backbone, settings, f"peft_{name}")
            with quiet_loading():
                setattr(self, f"{name}_model", get_peft_model(backbone, LoraConfig(**settings)))
            setattr(self.config, f"lora_{name}", settings)
            kinds = sorted({layer.rsplit(".", 1)[-1] for layer in matched})
            logger.info("LoRA on the %s model: %d layers (%s)", name, len(matched), ", ".join(kinds))
        self.vision_adapter.float().requires_grad_(True)
        return self

    def merge_lora(self) -> PhiClipMLLM:
        """Fold LoRA into the backbone weights in place (outputs unchanged); merged backbones are saved in full.

        A quantised LM is dequantised first, into its compute dtype, and stays so (model.quantize becomes null):
        merging into quantised weights would round the LoRA update to 4 or 8 bits.
        """
        from peft import PeftModel

        for name in ("text", "vision"):
            backbone = getattr(self, f"{name}_model")
            if isinstance(backbone, PeftModel) and is_quantized(backbone):
                with quiet_loading():
                    backbone = dequantized(backbone)
                self.config.quantize = None
            if isinstance(backbone, PeftModel):
                setattr(self, f"{name}_model", backbone.merge_and_unload())
                setattr(self.config, f"lora_{name}", None)
                if f"{name}_model" not in self.config.saved_backbones:
                    self.config.saved_backbones.append(f"{name}_model")
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward for the LM (and the vision tower when it trains LoRA)."""
        backbones = [self.text_model]
        if any(p.requires_grad for p in self.vision_model.parameters()):
            backbones.append(self.vision_model)
        for backbone in backbones:
            set_activation_checkpointing(backbone, True)

    def compile_language_model(self, backend: str | Callable = "inductor") -> None:
        """torch.compile each LM decoder layer for training steps (BENCHMARKS.md has the measured gain).

        Layer by layer rather than the whole model: one compiled graph serves all layers, compiles in seconds and
        leaves the data-dependent image scatter in eager mode. Without gradients (evaluation, generation) a layer
        runs eagerly: transformers' KV cache makes dynamo guard on each layer's index, so one generate() call
        recompiled every layer and used up dynamo's recompile limit in the middle of a training run (issue 12).
        """
        for layer in self.text_model.get_decoder().layers:
            layer.forward = _compiled_when_training(layer.forward, torch.compile(layer.forward, backend=backend))

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameter counts (meta-device models included)."""
        total = sum(logical_numel(p) for p in self.parameters())
        trainable = sum(logical_numel(p) for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path, merge_lora: bool = False) -> Path:
        """Write a complete checkpoint directory: complete or not loadable, never half of one.

        Backbone weights are written only where they cannot be re-loaded from their name/path: random-init or
        already-saved backbones, and LoRA-merged ones. `merge_lora=True` merges LoRA into the live model in place
        (its outputs are unchanged) and saves plain backbones. An existing directory keeps what else it holds (a
        run's checkpoints and logs, Trainer's files): the model's files replace their namesakes, config.json last.
        """
        return save_checkpoint(self, directory, merge_lora)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        trainable: bool = False,
        **runtime: Any,
    ) -> PhiClipMLLM:
        """Restore a checkpoint directory written by save_pretrained (or a file inside it).

        `trainable=True` leaves LoRA and adapter weights trainable (phase-two continuation, resume). `runtime`
        replaces settings that change no weight (max_length, attn_implementation, prompt_format, quantize); the
        tokenizer is always the checkpoint's own copy (its embeddings were trained with it), so `tokenizer` may only
        repeat the recorded one.
        """
        return load_checkpoint(cls, path, dtype, device, trainable, **runtime)


def set_activation_checkpointing(backbone: nn.Module, on: bool) -> None:
    """Activation checkpointing on or off for a backbone (LoRA-wrapped or not), under either transformers spelling.

    transformers 5.24 names it activation_checkpointing_* (keeping the old name as a deprecated alias); 5.17 and
    older have only gradient_checkpointing_*.
    """
    base = base_model(backbone)
    new_names = hasattr(base, "activation_checkpointing_enable")
    if on:
        kwargs = {"use_reentrant": False}  # frozen inputs: the reentrant variant would drop LoRA gradients
        if new_names:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        base.activation_checkpointing_disable() if new_names else base.gradient_checkpointing_disable()
        base.disable_input_require_grads()  # enabling added a hook that makes the embedding output require grad


def loss_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's summed loss and its supervised-token count, from forward's (supervised positions') logits.

    Sums and counts, not means: a split's loss per token is their totals' ratio, whatever the batching.
    """
    targets = labels[:, 1:]
    supervised = targets != -100
    token_losses = F.cross_entropy(logits.float(), targets[supervised], reduction="none")
    rows = supervised.nonzero()[:, 0]  # boolean indexing took the positions in this same row-major order
    sums = torch.zeros(len(targets), device=logits.device).index_add_(0, rows, token_losses)
    return sums, supervised.sum(1)


def _compiled_when_training(eager: Callable, compiled: Callable) -> Callable:
    # torch.compile has no "only with gradients" switch, hence this dispatch (a Python check outside the graph).
    def forward(*args, **kwargs):
        return (compiled if torch.is_grad_enabled() else eager)(*args, **kwargs)

    return forward


def generate(
    model: PhiClipMLLM,
    prompts: str | list[str] | list[list[dict]],
    images: Any = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    streamer: Any = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate a reply per prompt (x num_return_sequences), prompted exactly as in training: generate_ids' replies
    as text (its docstring says how)."""
    new_ids = generate_ids(
        model,
        prompts,
        images,
        max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_return_sequences,
        streamer=streamer,
        **generate_kwargs,
    )
    texts = model.tokenizer.batch_decode(new_ids, skip_special_tokens=True) if len(new_ids) else []  # 5.0: [""]
    return [text.strip() for text in texts]


@torch.no_grad()
def generate_ids(
    model: PhiClipMLLM,
    prompts: str | list[str] | list[list[dict]],
    images: Any = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    streamer: Any = None,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """The token ids of a reply per prompt (x num_return_sequences), prompted exactly as in training: one row each,
    pad ids after a reply's stop token; a row without one reached max_new_tokens (or was ended by a stop_strings,
    max_time or stopping_criteria keyword). generate() decodes them.

    `images`: paths, PIL images or HxWxC uint8 arrays, one per prompt (or a list per prompt). Batched with left
    padding; the LM's own `generate` runs on the embeddings with its KV cache and stops at <|end|> / <|endoftext|>.
    Other keywords (num_beams, min_new_tokens, length_penalty, ...) go to that `generate` as they are.
    A prompt may also be a whole conversation, a list of {"role", "content"} turns (as multi-turn training data).
    No prompts, no replies: an empty list gives none.
    """
    if isinstance(prompts, (list, tuple)) and not prompts:  # an empty batch (a filter kept nothing) is no error
        given = 0 if images is None else len(images) if isinstance(images, (list, tuple)) else 1
        if given:
            raise ValueError(f"0 prompts but {given} images: give one image (or list) per prompt")
        return torch.empty(0, 0, dtype=torch.long)
    taken = sorted(
        {"inputs_embeds", "input_ids", "attention_mask", "eos_token_id", "pad_token_id"} & set(generate_kwargs)
    )
    if taken:
        raise ValueError(
            f"generate(): {taken} are set from the prompts and the checkpoint's stop tokens; leave them out"
        )
    if generate_kwargs.get("return_dict_in_generate"):
        raise ValueError(
            "generate(): return_dict_in_generate is not supported: this returns the replies' text (generate_ids: "
            "their ids); for scores, call model.text_model.generate(inputs_embeds=model.embed(...), ...) yourself"
        )
    if isinstance(prompts, (list, tuple)) and isinstance(prompts[0], dict):  # one conversation, not a list of them
        prompts = [prompts]
    # The processor refuses bad input (an image that cannot be read) before the model's mode is touched.
    if isinstance(prompts, (list, tuple)) and isinstance(prompts[0], (list, tuple)):
        batch = model.processor(
            conversations=list(prompts), images=images, padding_side="left", add_generation_prompt=True
        )
    else:
        batch = model.processor(prompts, images, padding_side="left", add_generation_prompt=True)
    device = model.text_model.get_input_embeddings().weight.device
    # Each module's own mode comes back: a loaded model's backbones are in eval mode, and model.train(True) after
    # generation would switch on their (LoRA) dropout for every later forward.
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        pixel_values = batch.get("pixel_values")
        embeddings = model.embed(input_ids, None if pixel_values is None else pixel_values.to(device))
        # Greedy decoding ignores them, and transformers warns of any given a value other than its default.
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
        # The ids go along with the embeddings, as in Llava: processors that look at the prompt's tokens
        # (repetition_penalty, no_repeat_ngram_size) see them; the output then starts with the prompt.
        output_ids = model.text_model.generate(
            input_ids=input_ids,
            inputs_embeds=embeddings,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            repetition_penalty=repetition_penalty,
            num_return_sequences=num_return_sequences,
            eos_token_id=model.processor.stop_token_ids,
            pad_token_id=model.processor.pad_token_id,
            streamer=streamer,
            **sampling,
            **{"tokenizer": model.tokenizer, **generate_kwargs},  # stop_strings need it, and find no other
        )
    finally:
        for module, training in modes:
            module.training = training
    return output_ids[:, input_ids.shape[1] :]
