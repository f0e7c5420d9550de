"""PhiClipMLLM: a CLIP vision tower, an MLP adapter and Phi-3, with its config and checkpoints.

An image takes one path, in training and in generation:
    PhiClipProcessor: prompt format -> tokens, each <|placeholder1|> expanded to `num_image_tokens` ids, labels
    PhiClipMLLM.forward: CLIP (stopped at the feature layer) -> adapter -> masked_scatter into text embeddings -> LM
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging as hf_logging

from config import PhiClipConfig
from processor import IMAGE_TOKEN, PhiClipProcessor, image_processor_class
from quantization import dequantized, is_quantized, load_kwargs, logical_numel, quantize_built

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_TOKEN", "MultimodalProjector", "PhiClipConfig", "PhiClipMLLM", "PhiClipProcessor"]

ADAPTER_FILE = "adapter.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
CONTIGUOUS_VALUE_SDPA = "sdpa_contiguous_value"


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
        tokenizer=None,
        image_processor=None,
    ):
        super().__init__()
        self.config = config = copy.deepcopy(config)
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.tokenizer = tokenizer or _load_tokenizer(config, ckpt)
        self.text_model = _load_backbone(config, "text", ckpt, dtype, self.tokenizer)
        vision_model = _load_backbone(config, "vision", ckpt, dtype, self.tokenizer)
        vision_config = vision_model.config
        # Stop the tower at the feature layer: layers past it would cost compute and memory for nothing.
        encoder = getattr(vision_model, "vision_model", vision_model).encoder  # older transformers nest it
        used_layers = self._resolve_feature_layer(config.vision_feature_layer, len(encoder.layers))
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
            image_processor = _load_image_processor(config, ckpt, vision_config.image_size)
        self.processor = PhiClipProcessor(
            self.tokenizer, image_processor, self.num_image_tokens, config.prompt_format, config.max_length
        )
        self.image_token_id = self.processor.image_token_id
        if config.quantize:  # bitsandbytes put the LM on its device (quantisation happens there): keep all together
            self.to(self.text_model.get_input_embeddings().weight.device)

    @staticmethod
    def _resolve_feature_layer(layer: int, total_layers: int) -> int:
        # hidden_states has total_layers + 1 entries (the embeddings first): index k is the output of k layers.
        used = layer if layer >= 0 else total_layers + 1 + layer
        if not 1 <= used <= total_layers:
            raise ValueError(
                f"model.vision_feature_layer={layer} is outside the vision model's {total_layers} layers "
                f"(use 1..{total_layers} or -1..-{total_layers})"
            )
        return used

    @property
    def image_processor(self):
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
        **kwargs,
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
        """Phase two: add peft LoRA to the backbones; train LoRA + adapter, freeze everything else."""
        from peft import LoraConfig, get_peft_model

        self.requires_grad_(False)
        for name, settings in (("text", text_lora), ("vision", vision_lora)):
            if not settings:
                continue
            backbone = getattr(self, f"{name}_model")
            settings = dict(settings)
            _check_lora_targets(backbone, settings.get("target_modules"), f"peft_{name}")
            with quiet_loading():
                setattr(self, f"{name}_model", get_peft_model(backbone, LoraConfig(**settings)))
            setattr(self.config, f"lora_{name}", settings)
        self.vision_adapter.float().requires_grad_(True)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward for the LM (and the vision tower when it trains LoRA)."""
        backbones = [self.text_model]
        if any(p.requires_grad for p in self.vision_model.parameters()):
            backbones.append(self.vision_model)
        for backbone in backbones:
            base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
            kwargs = {"use_reentrant": False}  # frozen inputs: the reentrant variant would drop LoRA gradients
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def compile_language_model(self, backend: str = "inductor") -> None:
        """torch.compile each LM decoder layer (1.56x phase-one samples/s on an H200, see BENCHMARKS.md).

        Layer by layer rather than the whole model: one compiled graph serves all layers, compiles in seconds and
        leaves the data-dependent image scatter in eager mode.
        """
        for layer in self.text_model.get_decoder().layers:
            layer.compile(backend=backend)

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameter counts (meta-device models included)."""
        total = sum(logical_numel(p) for p in self.parameters())
        trainable = sum(logical_numel(p) for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, directory: str | Path, merge_lora: bool = False) -> Path:
        """Write a complete checkpoint directory (atomically: it is complete or absent).

        Backbone weights are written only where they cannot be re-loaded from their name/path: random-init or
        already-saved backbones, and LoRA-merged ones. `merge_lora=True` merges LoRA into the live model in place
        (its outputs are unchanged) and saves plain backbones; a quantised LM is dequantised first, into its compute
        dtype, and stays so (model.quantize becomes null). Quantised weights are never written: a stored quantised LM
        is dequantised, and quantised again when loaded.
        """
        from peft import PeftModel

        directory = Path(directory)
        staging = directory.with_name(directory.name + ".incomplete")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        config = copy.deepcopy(self.config)
        for name in ("text", "vision"):
            backbone = getattr(self, f"{name}_model")
            has_lora = isinstance(backbone, PeftModel)
            if merge_lora and is_quantized(backbone):  # merge into dequantised weights, not re-quantised ones
                with quiet_loading():
                    backbone = dequantized(backbone)
                setattr(self, f"{name}_model", backbone)
                self.config.quantize = config.quantize = None
            if has_lora and merge_lora:
                backbone = backbone.merge_and_unload()
                setattr(self, f"{name}_model", backbone)
                setattr(self.config, f"lora_{name}", None)
                setattr(config, f"lora_{name}", None)
                has_lora = False
            elif has_lora:
                backbone.save_pretrained(staging / f"lora_{name}")
            stored = f"{name}_model" in config.saved_backbones
            if isinstance(getattr(config, f"{name}_model"), dict) or stored or merge_lora:
                base = backbone.get_base_model() if has_lora else backbone
                with quiet_loading():
                    base = dequantized(base) if is_quantized(base) else base
                    base.save_pretrained(staging / f"{name}_model", state_dict=_without_lora(base.state_dict()))
                if not stored:
                    config.saved_backbones.append(f"{name}_model")
                    if merge_lora:
                        self.config.saved_backbones.append(f"{name}_model")
        adapter_state = {k: v.detach().contiguous() for k, v in self.vision_adapter.state_dict().items()}
        save_file(adapter_state, staging / ADAPTER_FILE)
        self.tokenizer.save_pretrained(staging)
        self.image_processor.save_pretrained(staging)
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        trainable: bool = False,
        quantize: str | None = "stored",
    ) -> PhiClipMLLM:
        """Restore a checkpoint directory written by save_pretrained (or a file inside it).

        `trainable=True` leaves LoRA and adapter weights trainable (phase-two continuation, resume). `quantize`
        (null, "8bit", "4bit") replaces the stored model.quantize, e.g. to run a bf16-trained model on a small GPU.
        """
        from peft import PeftModel

        path = Path(path)
        if not path.is_dir() and (path.parent / "config.json").is_file():
            path = path.parent  # a file named inside a checkpoint (the seed passed .../model_checkpoint.pt)
        elif path.is_file():
            if path.suffix in PICKLE_SUFFIXES:
                raise ValueError(
                    f"{path}: is a pickled checkpoint ({path.suffix}); PhiClipMLLM does not unpickle files. "
                    f"Load a directory written by save_pretrained (config.json + {ADAPTER_FILE})"
                )
            path = path.parent
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a PhiClipMLLM checkpoint (expected config.json and {ADAPTER_FILE})")
        if not (path / ADAPTER_FILE).is_file():
            raise FileNotFoundError(f"{path}: checkpoint is incomplete, {ADAPTER_FILE} is missing")
        config = PhiClipConfig.from_dict(
            json.loads((path / "config.json").read_text()), where=str(path / "config.json")
        )
        if quantize != "stored":
            config = dataclasses.replace(config, quantize=quantize)  # validated again
        model = cls(config, checkpoint_dir=path, dtype=dtype)
        for name in ("text", "vision"):
            if getattr(config, f"lora_{name}"):
                lora_dir = path / f"lora_{name}"
                if not (lora_dir / "adapter_config.json").is_file():
                    raise FileNotFoundError(f"{lora_dir}: LoRA adapter missing (config.json records lora_{name})")
                backbone = getattr(model, f"{name}_model")
                with quiet_loading():
                    backbone = PeftModel.from_pretrained(backbone, lora_dir, is_trainable=trainable)
                setattr(model, f"{name}_model", backbone)
        model.vision_adapter.load_state_dict(load_file(path / ADAPTER_FILE))
        model.requires_grad_(False)
        if trainable:
            model.vision_adapter.float().requires_grad_(True)
            for parameter_name, parameter in model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.requires_grad_(True)
        return model.to(device) if device is not None else model


def _attention_with_contiguous_value() -> str:
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


# A full CLIP checkpoint (openai/clip-vit-large-patch14 is one) also holds the text tower and projections.
CLIP_NON_VISION_KEYS = (r"(^|\.)text_model\.", r"(^|\.)(text|visual)_projection\.", r"(^|\.)logit_scale$")


@contextlib.contextmanager
def quiet_loading():
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


def _without_lora(state_dict: dict) -> dict:
    # A LoRA-wrapped layer stores its frozen weight as `<layer>.base_layer.weight`; give back the plain names.
    return {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if "lora_" not in k}


def _check_lora_targets(backbone: nn.Module, targets, where: str) -> None:
    # peft only complains when *no* target matches; a single dead target (the seed's CLIP `o_proj`) passed silently.
    if not targets:
        raise ValueError(f"{where}.target_modules: give the module names to adapt, e.g. ['q_proj', 'v_proj']")
    targets = [targets] if isinstance(targets, str) else list(targets)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    dead = [t for t in targets if t not in linear_names]
    if dead:
        raise ValueError(
            f"{where}.target_modules: {dead} match no linear layer of {type(backbone).__name__}; "
            f"available: {sorted(linear_names)}"
        )


def _load_tokenizer(config: PhiClipConfig, checkpoint_dir: Path | None):
    source = checkpoint_dir or config.tokenizer or config.text_model
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except OSError as error:
        raise OSError(f"model.tokenizer: cannot load a tokenizer from {str(source)!r} ({error})") from error


def _load_image_processor(config: PhiClipConfig, checkpoint_dir: Path | None, image_size: int):
    processor_class = image_processor_class()
    if checkpoint_dir is not None:
        return processor_class.from_pretrained(str(checkpoint_dir))
    if isinstance(config.vision_model, str):
        try:
            return processor_class.from_pretrained(config.vision_model)
        except OSError:
            logger.warning(
                "%s has no preprocessor_config.json: using CLIP's defaults at %d px", config.vision_model, image_size
            )
    # An inline (random) tower, or none saved: CLIP's preprocessing at the tower's resolution.
    return processor_class(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def _load_backbone(config: PhiClipConfig, name: str, checkpoint_dir: Path | None, dtype, tokenizer) -> nn.Module:
    source = getattr(config, f"{name}_model")
    auto_class = AutoModelForCausalLM if name == "text" else CLIPVisionModel
    attn = config.attn_implementation
    quantization = load_kwargs(config.quantize, dtype) if name == "text" and config.quantize else {}
    if checkpoint_dir is not None and f"{name}_model" in config.saved_backbones:
        source = str(checkpoint_dir / f"{name}_model")
    if isinstance(source, dict):
        values = dict(source)
        if name == "text":
            # An inline LM is sized for the tokenizer it comes with.
            values.setdefault("vocab_size", len(tokenizer))
            values.setdefault("pad_token_id", tokenizer.pad_token_id)
            values.setdefault("eos_token_id", tokenizer.convert_tokens_to_ids("<|endoftext|>"))
            values.setdefault("bos_token_id", None)
            if values["vocab_size"] < len(tokenizer):
                raise ValueError(
                    f"model.text_model.vocab_size={values['vocab_size']} < tokenizer size {len(tokenizer)}"
                )
        model_config = AutoConfig.for_model(**values)
        if name == "text":
            model = auto_class.from_config(model_config, dtype=dtype, attn_implementation=attn)
        else:
            model = auto_class._from_config(model_config, dtype=dtype, attn_implementation=attn)
    else:
        try:
            with quiet_loading():
                model = auto_class.from_pretrained(source, dtype=dtype, attn_implementation=attn, **quantization)
        except OSError as error:
            raise OSError(f"model.{name}_model: cannot load {source!r} ({error})") from error
    if quantization and isinstance(source, dict):
        with quiet_loading():
            model = quantize_built(model, dtype, attn, **quantization)
    if name == "text" and attn == "sdpa":
        model.set_attn_implementation(_attention_with_contiguous_value())
    return model
