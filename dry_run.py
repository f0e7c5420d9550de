"""Dry run: build the configured model on the meta device, estimate its peak GPU memory, and say what would fit.

    python train.py --phase_one --config training_configs/phi_clip.yaml --dry_run [--gpu_memory_gb 24]

No weights are loaded and nothing needs the hub (nor bitsandbytes): backbones named by hub id use their local config
when cached, otherwise the published architectures below. Quantisation, 8-bit optimiser states and checkpointing are
accounted for from the shapes. When the configuration does not fit `--gpu_memory_gb`, it prints the largest batch
size that does (with the accumulation that keeps the global batch) and the smallest sets of switches that do.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from torch import nn

from config import KNOWN_ARCHITECTURES, ConfigError, shown_path, torch_dtype
from lora import base_model
from model import PhiClipConfig, PhiClipMLLM
from processor import build_word_tokenizer

STAND_IN_VOCABULARY = 32064  # Phi-3-mini's embedding rows, when no tokenizer is available offline
ANSWER_TOKENS = 64  # supervised tokens per sample assumed for the logits term (COCO captions are shorter)
# Bytes a quantised weight takes: NF4 packs two weights a byte, plus one 8-bit absmax per block of 64 and one fp32
# scale per 256 absmax (double quantisation); LLM.int8 stores one byte (plus an fp32 scale per output row).
QUANTIZED_WEIGHT_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
# Optimiser-state bytes per trainable weight: AdamW's two fp32 moments, or bitsandbytes' two 8-bit ones with an
# fp32 absmax per block of 256; bitsandbytes keeps 32-bit states for tensors under 4096 values.
STATE_BYTES = {"adamw_torch": 8.0, "adamw_8bit": 2 + 8 / 256, "paged_adamw_8bit": 2 + 8 / 256}
EIGHT_BIT_STATES_FROM = 4096
FRAGMENTATION, CUDA_CONTEXT_BYTES = 0.05, 1e9


def _architecture(source: str | dict, kind: str) -> dict:
    if isinstance(source, dict):
        return dict(source)
    from transformers import AutoConfig, CLIPVisionConfig

    loader = CLIPVisionConfig.from_pretrained if kind == "vision" else AutoConfig.from_pretrained
    try:
        return loader(source, local_files_only=True).to_dict()
    except (OSError, ValueError):
        if source in KNOWN_ARCHITECTURES:
            return dict(KNOWN_ARCHITECTURES[source])
        raise ConfigError(
            f"model.{kind}_model: {source!r} is neither local nor a known architecture "
            f"({list(KNOWN_ARCHITECTURES)}); a dry run needs its config offline"
        ) from None


def quantizable_linears(model: PhiClipMLLM) -> list[nn.Linear]:
    """The LM's linear layers bitsandbytes replaces: every one but lm_head (and LoRA's own)."""
    base = base_model(model.text_model)
    head = base.get_output_embeddings()
    return [m for n, m in base.named_modules() if isinstance(m, nn.Linear) and m is not head and "lora_" not in n]


def memory_breakdown(
    model: PhiClipMLLM,
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
    quantize: str | None = None,
    optim: str = "adamw_torch",
) -> dict[str, float]:
    """Peak GPU memory of one bf16 training step, in GB, by part; `total` is what the card needs.

    - Weights at their dtype (frozen backbones bf16, adapter and LoRA fp32); with `quantize`, the LM's linear layers
      (all but lm_head) at QUANTIZED_WEIGHT_BYTES. Per trainable weight an fp32 gradient plus STATE_BYTES[optim].
    - Every sample is `seq_len` tokens (model.max_length: the worst case) with one image.
    - Saved activations per token and transformer layer (h hidden, i MLP width): 2(6h + 3i) bytes in bf16 (q, k,
      v and output of SDPA/flash attention without the seq^2 score matrix, the MLP's three i-wide tensors) + 8h
      for the norms' fp32 upcasts, + each LoRA-adapted linear's input (2 bytes per value, 3 with lora_dropout's
      mask); a frozen linear keeps nothing, quantised or not. With gradient checkpointing a layer keeps only its
      bf16 input, and one layer at a time is recomputed.
    - The vision tower keeps nothing while frozen (it runs without a graph); with LoRA it costs as above per
      image token. The adapter keeps fp32 inputs and hidden states; the logits are fp32 for ANSWER_TOKENS
      supervised positions per sample (logits, softmax, gradient).
    - Quantised matmuls need scratch space for the largest linear layer: 4bit dequantises its weight to bf16;
      8bit (LLM.int8) quantises its input to int8 and multiplies into int32 before rescaling to 16 bits.
    - `allocated` (what torch.cuda.max_memory_allocated measures) is the sum of the above; `total` adds 5%
      allocator fragmentation and 1 GB for the CUDA context and kernel workspaces.
    Checked on an H200 with random real-size weights (batch 8 x 384, bf16): the total was 0.5-1.3 GB above the
    measured peak (reserved memory + 0.5 GB context) for both phases, with and without checkpointing.
    """
    tokens, image_tokens = batch_size * seq_len, batch_size * model.num_image_tokens
    linears = quantizable_linears(model) if quantize else []
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for linear in linears:
        scales = 4 * linear.out_features if quantize == "8bit" else 0
        weights -= linear.weight.numel() * (linear.weight.element_size() - QUANTIZED_WEIGHT_BYTES[quantize]) - scales
    optimizer = 0.0
    for p in model.parameters():
        if p.requires_grad:
            eight_bit = optim != "adamw_torch" and p.numel() >= EIGHT_BIT_STATES_FROM
            optimizer += p.numel() * (4 + (STATE_BYTES[optim] if eight_bit else STATE_BYTES["adamw_torch"]))

    def tower(backbone, tokens: int) -> int:
        config = base_model(backbone).config
        layers, h, i = config.num_hidden_layers, config.hidden_size, config.intermediate_size
        lora = [m for m in backbone.modules() if hasattr(m, "lora_A") and hasattr(m, "in_features") and m.lora_A]
        dropout = any(not isinstance(d, torch.nn.Identity) for m in lora for d in m.lora_dropout.values())
        per_layer = tokens * (2 * (6 * h + 3 * i) + 8 * h + sum(m.in_features for m in lora) * (2 + dropout) // layers)
        return layers * 2 * tokens * h + per_layer if checkpointing else layers * per_layer

    vision_trains = any(p.requires_grad for p in model.vision_model.parameters())
    text_config = model.text_model.config
    activations = (
        tower(model.text_model, tokens)
        + (tower(model.vision_model, image_tokens) if vision_trains else 0)
        + 4 * image_tokens * (model.vision_model.config.hidden_size + 2 * (model.config.adapter_dim or 0))
        + 4 * tokens * text_config.hidden_size
        + 12 * batch_size * ANSWER_TOKENS * text_config.vocab_size
    )
    workspace = 0
    if quantize == "4bit":
        workspace = max(2 * m.weight.numel() for m in linears)
    elif quantize == "8bit":
        workspace = max(max(tokens * (3 * m.in_features + 8 * m.out_features), 2 * m.weight.numel()) for m in linears)
    allocated = weights + optimizer + activations + workspace
    parts = dict(weights=weights, optimizer=optimizer, activations=activations, workspace=workspace)
    parts.update(allocated=allocated, total=(1 + FRAGMENTATION) * allocated + CUDA_CONTEXT_BYTES)
    return {name: value / 1e9 for name, value in parts.items()}


def build_meta_model(config: dict, phase: str) -> tuple[PhiClipMLLM, dict]:
    """The configured model on the meta device (no weights), and what the report says about it.

    The second value holds the backbones' labels, the tokenizer used and the quantisation in effect (phase two:
    the phase-one model's, unless the config's model section sets one, as train.py's build_model does).
    """
    load_dir = Path(config["checkpoint"]["load_dir"] or "")
    if phase == "two" and (load_dir / "config.json").is_file():
        model_config = json.loads((load_dir / "config.json").read_text())
        model_config.update({name: str(load_dir / name) for name in model_config.get("saved_backbones", [])})
        # As train.py: the config's runtime keys (max_length, quantize, ...) override the loaded model's settings.
        runtime = set(PhiClipConfig.RUNTIME_KEYS) - {"tokenizer"}  # a different tokenizer is an error in train.py
        model_config.update({k: v for k, v in (config["model"] or {}).items() if k in runtime})
    elif config["model"] is not None:
        model_config = dict(config["model"])
    else:
        raise ConfigError(f"{config['path']}: a dry run needs a model section or an existing checkpoint.load_dir")
    names = {key: model_config.get(key, getattr(PhiClipConfig, key)) for key in ("text_model", "vision_model")}
    architectures = {key: _architecture(source, key.removesuffix("_model")) for key, source in names.items()}
    text, vision = architectures["text_model"], architectures["vision_model"]
    tokenizer_source = str(model_config.get("tokenizer") or names["text_model"])
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
        vocabulary = f"{tokenizer_source} ({len(tokenizer)} tokens)"
    except (OSError, ValueError, TypeError):
        tokenizer = build_word_tokenizer(["a"], vocab_size=300)  # has the special tokens the processor checks
        text.setdefault("vocab_size", STAND_IN_VOCABULARY)
        vocabulary = f"stand-in for {tokenizer_source!r} (unavailable offline), vocabulary {text['vocab_size']}"
    quantize = model_config.get("quantize")
    model_config.update(
        text_model=text,
        vision_model=vision,
        tokenizer="-",
        lora_text=None,
        lora_vision=None,
        saved_backbones=[],
        quantize=None,  # the meta model is built plain: quantisation is accounted for from its shapes
    )
    with torch.device("meta"):
        model = PhiClipMLLM(
            PhiClipConfig.from_dict(model_config),
            dtype=torch_dtype(config["dtype"]),
            tokenizer=tokenizer,
            image_processor=object(),
        ).prime_model("one")
        if phase == "two":
            try:
                model.setup_lora(config["peft_text"], config["peft_vision"])
            except ValueError as error:  # targets that match nothing: as train.py's build_model reports them
                raise ConfigError(f"{config['path']}: {error}") from None
    labels = {
        key: source if isinstance(source, str) else f"inline {architectures[key]['model_type']}"
        for key, source in names.items()
    }
    about = {"labels": labels, "vocabulary": vocabulary, "quantize": quantize, "notes": []}
    if phase == "two" and not (load_dir / "config.json").is_file():
        about["notes"].append(
            f"checkpoint.load_dir {shown_path(load_dir)} holds no phase-one model yet: planned from this config's model "
            "section, with the default backbones where it names none"
        )
    return model, about


def fit_advice(model: PhiClipMLLM, config: dict, settings: dict, gpu_memory_gb: float) -> list[str]:
    """What makes a configuration that does not fit in `gpu_memory_gb` fit: a smaller batch with more accumulation
    (the same global batch), and the smallest sets of memory switches that fit at the configured batch."""
    args, seq_len = config["training_args"], model.config.max_length
    batch, global_batch = args["batch_size"], args["batch_size"] * args["gradient_accumulation_steps"]

    def estimate(size: int, **changes) -> float:
        return memory_breakdown(model, size, seq_len, **(settings | changes))["total"]

    def largest_batch(switches: str = "", **changes) -> str:
        for size in range(batch - 1, 0, -1):
            if global_batch % size == 0 and (gb := estimate(size, **changes)) <= gpu_memory_gb:
                steps = global_batch // size
                return (
                    f"batch {size} x {steps} accumulation steps (global batch {global_batch} kept), {gb:.1f} GB: "
                    f"{switches}--set training_args.batch_size={size} "
                    f"--set training_args.gradient_accumulation_steps={steps}"
                )
        return f"none (batch 1: {estimate(1, **changes):.1f} GB)"

    lines = [f"  to fit in {gpu_memory_gb:g} GB:", f"    largest batch as configured: {largest_batch()}"]
    choices = []  # each switch: the settings it changes and how it is set
    if not settings["checkpointing"]:
        choices.append([({"checkpointing": True}, "training_args.gradient_checkpointing=true")])
    quantize_options = {None: ("8bit", "4bit"), "8bit": ("4bit",), "4bit": ()}[settings["quantize"]]
    if quantize_options:
        choices.append([({"quantize": mode}, f"model.quantize={mode}") for mode in quantize_options])
    if settings["optim"] == "adamw_torch":
        choices.append([({"optim": "adamw_8bit"}, "training_args.optim=adamw_8bit")])
    fitting = []
    for chosen in itertools.product(*[[None, *options] for options in choices]):
        switches = [switch for switch in chosen if switch is not None]
        changes = {k: v for change, _ in switches for k, v in change.items()}
        if switches and (gb := estimate(batch, **changes)) <= gpu_memory_gb:
            fitting.append(({flag for _, flag in switches}, gb))

    minimal = [(flags, gb) for flags, gb in fitting if not any(other < flags for other, _ in fitting)]
    for flags, gb in sorted(minimal, key=lambda item: (len(item[0]), -item[1]))[:4]:
        lines.append(f"    at batch {batch}, {gb:.1f} GB: {' '.join(f'--set {f}' for f in sorted(flags))}")
    if not choices:
        lines.append("    every memory switch (checkpointing, 4bit, 8-bit optimiser states) is already on")
    elif not minimal:
        strongest = [options[-1] for options in choices]
        every = {k: v for change, _ in strongest for k, v in change.items()}
        flags = "".join(f"--set {flag} " for _, flag in strongest)
        lines.append(f"    no switch fits batch {batch}; with all of them, {largest_batch(flags, **every)}")
    return lines


def dry_run(config: dict, phase: str, gpu_memory_gb: float = 24.0) -> str:
    """Build the configured model on the meta device (no weights) and report its size and memory needs."""
    model, about = build_meta_model(config, phase)
    counts = model.parameter_counts()

    def size(module, lora: bool) -> str:
        return f"{sum(p.numel() for n, p in module.named_parameters() if ('lora_' in n) == lora):,}"

    args = config["training_args"]
    batch, seq_len = args["batch_size"], model.config.max_length
    settings = {"checkpointing": args["gradient_checkpointing"], "quantize": about["quantize"], "optim": args["optim"]}
    quantized = "not quantised"
    if settings["quantize"]:
        linears = quantizable_linears(model)
        plain = sum(m.weight.numel() * m.weight.element_size() for m in linears) / 1e9
        packed = sum(m.weight.numel() for m in linears) * QUANTIZED_WEIGHT_BYTES[settings["quantize"]] / 1e9
        quantized = f"{settings['quantize']} (bitsandbytes): its linear layers {packed:.2f} GB instead of {plain:.2f}"
    lines = [
        f"dry run: {config['path']} (phase {phase}; meta device, no weights loaded)",
        *(f"  note: {note}" for note in about["notes"]),
        f"  text model: {about['labels']['text_model']}: {size(model.text_model, False)} parameters",
        f"  vision model: {about['labels']['vision_model']}: {size(model.vision_model, False)} parameters "
        f"({model.config.vision_feature_layer} layers used)",
        f"  adapter: {size(model.vision_adapter, False)}; LoRA text: {size(model.text_model, True)}; "
        f"LoRA vision: {size(model.vision_model, True)}",
        f"  total parameters: {counts['total']:,}",
        f"  trainable parameters: {counts['trainable']:,}",
        f"  tokenizer: {about['vocabulary']}; {model.num_image_tokens} image tokens per image",
        f"  language model {quantized}; optimiser {settings['optim']}",
        f"  peak GPU memory estimate ({config['dtype']}, batch {batch} x {seq_len} tokens, per GPU):",
    ]
    for checkpointing in (False, True):
        parts = memory_breakdown(model, batch, seq_len, checkpointing, settings["quantize"], settings["optim"])
        configured = " (configured)" if checkpointing == settings["checkpointing"] else ""
        verdict = "fits" if parts["total"] <= gpu_memory_gb else "does NOT fit"
        lines.append(
            f"    {'with' if checkpointing else 'without'} gradient checkpointing{configured}: "
            f"{parts['total']:.1f} GB ({parts['allocated']:.1f} allocated), {verdict} in {gpu_memory_gb:g} GB"
        )
    if memory_breakdown(model, batch, seq_len, **settings)["total"] > gpu_memory_gb:
        lines += fit_advice(model, config, settings, gpu_memory_gb)
    return "\n".join(lines)
