"""The language model quantised by bitsandbytes (`model.quantize: 8bit | 4bit`): loading, the device check, and
dequantisation for checkpoints and merges.

Loading is transformers' bitsandbytes integration (a `BitsAndBytesConfig` passed to from_pretrained); LoRA on the
quantised linears is peft's (QLoRA). CLIP, the adapter and LoRA weights stay unquantised. A checkpoint never holds
quantised weights: a backbone named by hub id or path is not stored at all, and one that must be stored (random-init,
or merged) is dequantised first, so every checkpoint also loads unquantised, without bitsandbytes
(`PhiClipMLLM.from_pretrained(path, quantize=None)`).

peft's `prepare_model_for_kbit_training` is deliberately not called. Of its three steps, freezing is what
prime_model/setup_lora already do; upcasting every unquantised weight to fp32 is for fp16 training and, under bf16
autocast, only costs memory (0.4 GB for Phi-3-mini's embeddings and lm_head, on an 8 GB card); and its gradient
checkpointing is training_args.gradient_checkpointing's job (non-reentrant, so no input-gradient hook is needed).
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch
from torch import nn

from config import ConfigError, require_bitsandbytes
from lora import base_model

QUANTIZED_PARAMETERS = ("Params4bit", "Int8Params")  # bitsandbytes' weight classes
INT8_MATMUL_LOGGER = "bitsandbytes.autograd._functions"  # logs "inputs will be cast ... to float16" at every matmul


class OncePerMessage(logging.Filter):
    """Lets each distinct message through once.

    LLM.int8 quantises a matmul's input through float16 by design, and bitsandbytes says so at every 8-bit matmul
    of a bf16 or fp32 model (each linear layer, each forward): on the CPU at each evaluation and every generated
    token (between the words of chat.py's reply), on a GPU (by bitsandbytes' code) in every training step too.
    Said once, it still tells what happens.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def quantization_device() -> torch.device:
    """Where the LM is quantised and kept: this process's GPU (LOCAL_RANK under torchrun/accelerate), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_device(mode: str, device: torch.device) -> None:
    """Raise a one-line ConfigError unless bitsandbytes can quantise `mode` on `device` (found by trying it)."""
    import bitsandbytes
    from bitsandbytes import functional

    probe = torch.linspace(-1, 1, 4096, device=device).reshape(64, 64)
    try:
        if mode == "4bit":
            functional.dequantize_4bit(*functional.quantize_4bit(probe, quant_type="nf4", compress_statistics=True))
        else:
            functional.int8_vectorwise_quant(probe.half())
    except Exception as error:  # whatever the backend raises, the answer is the same: not here
        reason = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"model.quantize={mode}: bitsandbytes {bitsandbytes.__version__} cannot quantise on {device} "
            f"({type(error).__name__}: {reason}); set model.quantize: null"
        ) from None


def load_kwargs(mode: str, dtype: torch.dtype | None) -> dict:
    """from_pretrained's keyword arguments that load the LM quantised on quantization_device().

    4bit: NF4 with double quantisation (the quantisation constants are quantised too: 0.37 bits a weight fewer),
    computing in `dtype` (bf16 in the real recipes). 8bit: LLM.int8() with its default outlier threshold.
    """
    require_bitsandbytes(f"model.quantize={mode}")
    device = quantization_device()
    check_device(mode, device)
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype or torch.float32,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
        matmul_logger = logging.getLogger(INT8_MATMUL_LOGGER)
        if not any(isinstance(f, OncePerMessage) for f in matmul_logger.filters):
            matmul_logger.addFilter(OncePerMessage())
    return {"quantization_config": config, "device_map": {"": str(device)}}


def quantize_built(model: nn.Module, dtype: torch.dtype | None, attn: str, **kwargs: Any) -> nn.Module:
    """Quantise an LM built in memory (an inline, random-init config) exactly as from_pretrained loads one."""
    name = model.config.name_or_path  # from_pretrained(None) would record "None", and peft would look it up online
    quantized = type(model).from_pretrained(
        None, config=model.config, state_dict=model.state_dict(), dtype=dtype, attn_implementation=attn, **kwargs
    )
    quantized.config.name_or_path = quantized.name_or_path = name
    return quantized


def is_quantized(module: nn.Module) -> bool:
    """Whether any weight of `module` is a bitsandbytes-quantised one."""
    return any(type(p).__name__ in QUANTIZED_PARAMETERS for p in module.parameters())


def logical_numel(parameter: torch.Tensor) -> int:
    """The number of weights a parameter stands for (a 4-bit weight packs two into each stored byte)."""
    state = getattr(parameter, "quant_state", None)
    return state.shape.numel() if state is not None else parameter.numel()


def dequantize_weight(linear: nn.Module) -> torch.Tensor:
    """A quantised linear layer's weight, dequantised (a plain layer's weight as it is)."""
    from peft.utils.integrations import dequantize_module_weight

    # On the CPU peft re-assigns `linear.weight = linear.weight.to(device)`, a new Int8Params without its scales
    # (they live in linear.state), which broke every later 8-bit forward: after a checkpoint save, training crashed.
    weight = linear.weight
    try:
        return dequantize_module_weight(linear)
    finally:
        linear.weight = weight


def dequantized(backbone: nn.Module) -> nn.Module:
    """A plain copy of a quantised LM, in the dtype of its unquantised weights, with its LoRA (if any) re-attached.

    Hand-written because neither library does this for a LoRA-wrapped model: transformers' dequantize() converts the
    live model in place and does not see through peft's LoRA layers, and peft's merge_and_unload merges into the
    quantised weight and quantises the sum again (rounding the LoRA update to 4 bits). Merging into this copy instead
    gives a model that computes what the quantised one did, up to the rounding of its dtype.
    """
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    has_lora = isinstance(backbone, PeftModel)
    base = base_model(backbone)
    dtype, device = base.get_input_embeddings().weight.dtype, base.get_input_embeddings().weight.device
    state = {}
    for module_name, module in base.named_modules():
        if "lora_" in module_name:
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if type(parameter).__name__ in QUANTIZED_PARAMETERS:
                parameter = dequantize_weight(module)
            state[f"{module_name}.{name}".replace(".base_layer.", ".")] = parameter.detach().to(dtype)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    attn = base.config._attn_implementation
    plain = type(base).from_pretrained(None, config=config, state_dict=state, dtype=dtype, attn_implementation=attn)
    plain.to(device)
    plain.config.name_or_path = plain.name_or_path = base.name_or_path
    if has_lora:
        adapter = backbone.active_adapter
        plain = get_peft_model(plain, copy.deepcopy(backbone.peft_config[adapter]), adapter_name=adapter)
        set_peft_model_state_dict(
            plain, get_peft_model_state_dict(backbone, adapter_name=adapter), adapter_name=adapter
        )
    return plain
