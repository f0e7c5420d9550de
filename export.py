"""Export a PhiClipMLLM checkpoint for use elsewhere: a transformers-native Llava directory, or a merged checkpoint.

    python export.py --checkpoint checkpoints/phi_clip_p2 --out exported/phi_clip_llava          # Llava (default)
    python export.py --checkpoint checkpoints/phi_clip_p2 --out exported/phi_clip_merged --format phiclip --merge

The Llava directory loads with `AutoModelForImageTextToText` / `LlavaForConditionalGeneration` and `AutoProcessor`
(no custom code), so `transformers serve`, vLLM and the rest of the Llava ecosystem run it. LoRA is merged into both
backbones; the CLIP tower is stored as trained (stopped at the feature layer); the processor's chat template writes
the prompts training wrote. A setting Llava cannot compute exactly is refused with one line naming it; the export is
never approximate, and it is checked: both models must give the same logits on a probe input before it is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from config import (
    ADAPTER_FILE,
    DTYPE_NAMES,
    IMAGE_TOKEN,
    CommandLine,
    ConfigError,
    backbone_architecture,
    checkpoint_directory,
    checkpoint_problem,
    fail,
)
from training_config import data_sources, load_config

FORMATS = ("llava", "phiclip")


def command_line() -> argparse.ArgumentParser:
    """export.py's arguments."""
    parser = CommandLine(description="Export a PhiClipMLLM checkpoint as a transformers Llava or merged directory.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory written by train.py")
    parser.add_argument("--out", required=True, help="new output directory (must not exist, or be empty)")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="llava",
        help="llava: transformers-native LlavaForConditionalGeneration (default); "
        "phiclip: a standalone PhiClipMLLM checkpoint (needs --merge)",
    )
    parser.add_argument("--merge", action="store_true", help="merge LoRA into the backbones (always done for llava)")
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="bfloat16", help="weight dtype of the Llava export (default bfloat16)"
    )
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard of the Llava export")
    parser.add_argument("--config", help="the training YAML, to name the data and recipe in the model card")
    parser.add_argument("--no_check", action="store_true", help="skip the logit comparison on a probe input")
    return parser


def unsupported_by_llava(values: dict, text_hidden: int | None, vision_hidden: int | None) -> str | None:
    """Why transformers' Llava cannot compute this model exactly (one line), or None when it can.

    `values` are a checkpoint's config.json values; the widths are None where they are not known yet.
    """
    if values.get("normalize", True):
        return (
            "model.normalize: true (L2-normalised image embeddings) has no exact equivalent in transformers' Llava, "
            "whose projector ends in a Linear layer; export it with --format phiclip --merge, or train with "
            "model.normalize: false to export to Llava"
        )
    adapter_dim = values.get("adapter_dim", 1024)
    if text_hidden is not None and adapter_dim is not None and adapter_dim > text_hidden:
        return (
            f"model.adapter_dim={adapter_dim} is wider than the language model's hidden size {text_hidden}, the "
            f"fixed hidden width of Llava's projector; export it with --format phiclip --merge, or train with "
            f"model.adapter_dim <= {text_hidden} to export to Llava"
        )
    if adapter_dim is None and None not in (text_hidden, vision_hidden) and 2 * vision_hidden > text_hidden:
        return (
            f"model.adapter_dim: null (one Linear layer) is written as Llava's Linear-ReLU-Linear projector through "
            f"x = relu(x) - relu(-x), which needs a language-model hidden size of at least twice the vision width "
            f"({2 * vision_hidden}), not {text_hidden}; export it with --format phiclip --merge, or train with an "
            f"MLP adapter (model.adapter_dim <= {text_hidden}) to export to Llava"
        )
    return None


def check_arguments(args: argparse.Namespace) -> None:
    """Bad input ends here as one `error:` line, before torch or any weight is loaded."""
    checkpoint = checkpoint_directory(args.checkpoint)
    if not checkpoint.is_dir():
        fail(f"--checkpoint {args.checkpoint}: no such directory")
    if problem := checkpoint_problem(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: {problem}")
    if not (checkpoint / ADAPTER_FILE).is_file():
        fail(f"--checkpoint {args.checkpoint}: checkpoint is incomplete, {ADAPTER_FILE} is missing")
    config_file = checkpoint / "config.json"
    try:
        values = json.loads(config_file.read_text())
    except ValueError as error:
        fail(f"{config_file}: not valid JSON ({error})")
    if not isinstance(values, dict):
        fail(f"{config_file}: expected a JSON object (the model's settings), got {type(values).__name__}")
    out = Path(args.out).expanduser()
    if out.resolve() == checkpoint.resolve():
        fail(f"--out {args.out}: must differ from --checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {args.out}: exists and is not an empty directory; choose a new one")
    if args.format == "phiclip" and not args.merge:
        fail("--format phiclip writes a standalone checkpoint with LoRA merged: add --merge")
    if args.config is not None:
        try:
            load_config(args.config, check_paths=False)
        except ConfigError as error:
            fail(str(error))
    if args.format == "llava":
        problem = unsupported_by_llava(
            values, _known_width(values, "text_model", checkpoint), _known_width(values, "vision_model", checkpoint)
        )
        if problem:
            fail(f"{config_file}: {problem}")


def _known_width(values: dict, key: str, checkpoint: Path) -> int | None:
    source = values.get(key)
    if key in values.get("saved_backbones", []):
        source = str(checkpoint / key)
    architecture = backbone_architecture(source) if isinstance(source, (str, dict)) else None
    return (architecture or {}).get("hidden_size")


if __name__ == "__main__":
    check_arguments(command_line().parse_args())  # answers --help and bad input before the imports below (~6 s)

import copy  # the heavy imports follow the early argument check above
import shutil

import torch
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from backbones import quiet_loading, read_config_file
from config import torch_dtype
from model import PhiClipMLLM
from processor import ANSWER_SEPARATOR
from quantization import dequantized, is_quantized

# The processor's chat template: each message's parts (text, image) stripped and joined by one space, the message
# trimmed, then the markup of processor.py's format_conversation. So `apply_chat_template` (and with it transformers
# serve, vLLM's chat endpoint) writes exactly the prompt training wrote: "Describe this image. <|placeholder1|>" for
# [text, image], as the caption data puts it. Roles other than user and assistant are refused, as in training.
_MESSAGE_TEXT = (
    "{%- set parts = namespace(items=[]) -%}"
    "{%- if message['content'] is string -%}{%- set parts.items = [message['content']] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.items = parts.items + ['" + IMAGE_TOKEN + "'] -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.items = parts.items + [part['text'] | trim] -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- set text = parts.items | join(' ') | trim -%}"
)
_ROLE_CHECK = (
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('this model was trained on user and assistant turns only, got ' + message['role']) }}"
    "{%- endif -%}"
)
CHAT_TEMPLATES = {
    "chat": "{%- for message in messages -%}" + _MESSAGE_TEXT + _ROLE_CHECK + "{{ '<|' + message['role'] + '|>\n' + "
    "text + '<|end|>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}",
    "seed": "{%- for message in messages -%}" + _MESSAGE_TEXT + _ROLE_CHECK + "{%- if message['role'] == 'user' -%}"
    "{{ text + ' " + ANSWER_SEPARATOR + "' }}{%- else -%}{{ text + '<|endoftext|> ' }}{%- endif -%}{%- endfor -%}",
}


def merge_and_dequantize(model: PhiClipMLLM) -> PhiClipMLLM:
    """Merge any LoRA into its backbone and dequantise a quantised LM, in place; returns the model.

    A Llava directory holds plain weights. A model trained quantised (model.quantize) computed with the dequantised
    4- or 8-bit weights, so those are what it exports (model.merge_lora): outputs stay what they were in training,
    up to the rounding of the dtype.
    """
    model.merge_lora()
    if is_quantized(model.text_model):  # quantised without LoRA: a phase-one model of the small-GPU recipe
        with quiet_loading():
            model.text_model = dequantized(model.text_model)
        model.config.quantize = None
    return model


def projector_state(model: PhiClipMLLM) -> tuple[str, dict[str, torch.Tensor]]:
    """Our adapter as Llava's Linear(vision, text) -> act -> Linear(text, text): (activation, state dict).

    Llava's hidden width is the LM's hidden size. A narrower MLP adapter is zero-padded to it (the extra units get
    zero weights in and out, so they add exact zeros whatever the activation gives at 0). A single Linear W becomes
    ReLU-Linear through x = relu(x) - relu(-x): linear_1 = [I; -I; 0], linear_2 = [W, -W, 0].
    """
    layers = model.vision_adapter.layers
    text_hidden = model.text_model.config.hidden_size
    first, last = layers[0], layers[-1]
    vision_hidden = first.in_features
    weight_1 = torch.zeros(text_hidden, vision_hidden, dtype=first.weight.dtype)
    bias_1 = torch.zeros(text_hidden, dtype=first.weight.dtype)
    weight_2 = torch.zeros(text_hidden, text_hidden, dtype=last.weight.dtype)
    if len(layers) == 1:
        activation = "relu"
        identity = torch.eye(vision_hidden, dtype=first.weight.dtype)
        weight_1[:vision_hidden], weight_1[vision_hidden : 2 * vision_hidden] = identity, -identity
        weight_2[:, :vision_hidden] = first.weight.detach()
        weight_2[:, vision_hidden : 2 * vision_hidden] = -first.weight.detach()
    else:
        activation = model.config.adapter_activation
        hidden = first.out_features
        weight_1[:hidden], bias_1[:hidden] = first.weight.detach(), first.bias.detach()
        weight_2[:, :hidden] = last.weight.detach()
    state = {"linear_1.weight": weight_1, "linear_1.bias": bias_1, "linear_2.weight": weight_2}
    state["linear_2.bias"] = last.bias.detach().clone()
    return activation, state


def llava_config(model: PhiClipMLLM, activation: str, dtype: torch.dtype) -> LlavaConfig:
    """LlavaConfig of the same model: the tower as stored, its last layer selected; CLS kept or dropped as trained."""
    vision_config = copy.deepcopy(model.vision_model.config)
    text_config = copy.deepcopy(model.text_model.config)
    for sub_config, architecture in ((vision_config, "CLIPVisionModel"), (text_config, "Phi3ForCausalLM")):
        sub_config.architectures = [architecture]  # vLLM picks the text model by it
        sub_config._attn_implementation = None  # ours may name attention registered in backbones.py only
        sub_config.dtype = dtype
        sub_config._name_or_path = ""  # else a local path of the exporting machine
    text_config.pad_token_id = model.processor.pad_token_id
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        projector_hidden_act=activation,
        # The stored tower has exactly the layers training used, so its last hidden state is the feature.
        vision_feature_layer=-1,
        vision_feature_select_strategy="full" if model.config.keep_cls else "default",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
        dtype=dtype,
    )


def to_llava(model: PhiClipMLLM, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """transformers' LlavaForConditionalGeneration computing what `model` computes (LoRA must be merged first).

    The Llava shares the backbone tensors (no copy) until it is cast to another dtype.
    """
    problem = unsupported_by_llava(
        model.config.to_dict(), model.text_model.config.hidden_size, model.vision_model.config.hidden_size
    )
    if problem:
        raise ValueError(problem)
    if model.config.lora_text or model.config.lora_vision:
        raise ValueError("merge LoRA first (export.merge_and_dequantize)")
    activation, projector_tensors = projector_state(model)
    config = llava_config(model, activation, dtype)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    # Llava's vision_tower is a CLIPVisionModel like ours (nested or not, per transformers version): same keys.
    parts = [
        (llava.model.vision_tower, model.vision_model, model.vision_model.state_dict()),
        (llava.model.multi_modal_projector, None, projector_tensors),
        (llava.model.language_model, model.text_model.get_decoder(), model.text_model.get_decoder().state_dict()),
        (llava.lm_head, None, model.text_model.get_output_embeddings().state_dict()),
    ]
    for target, source, state in parts:
        target.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers (rotary frequencies, CLIP's position ids) are in no state dict: take ours.
        source_buffers = dict(source.named_buffers()) if source is not None else {}
        for name, buffer in list(target.named_buffers()):
            if buffer.is_meta:
                owner, _, leaf = name.rpartition(".")
                target.get_submodule(owner).register_buffer(leaf, source_buffers[name], persistent=False)
    return llava.to(dtype).eval()


def llava_processor(model: PhiClipMLLM) -> LlavaProcessor:
    """LlavaProcessor with our image processor, tokenizer and a chat template that writes our prompt format."""
    template = CHAT_TEMPLATES[model.config.prompt_format]
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.chat_template = template  # text-only `tokenizer.apply_chat_template` agrees with the processor
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"  # batches need one; which one never matters (masked out)
    tokenizer.padding_side = "left"  # the Llava is used to generate: a batch must end where each reply starts
    keep_cls = model.config.keep_cls
    return LlavaProcessor(
        image_processor=model.image_processor,
        tokenizer=tokenizer,
        patch_size=model.vision_model.config.patch_size,
        vision_feature_select_strategy="full" if keep_cls else "default",
        chat_template=template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's CLS; "default" drops it again
    )


def generation_config(model: PhiClipMLLM) -> GenerationConfig:
    """Greedy by default, stopping at <|end|> and <|endoftext|> as generate() does."""
    return GenerationConfig(
        eos_token_id=model.processor.stop_token_ids,
        pad_token_id=model.processor.pad_token_id,
        bos_token_id=model.text_model.config.bos_token_id,
        do_sample=False,
        max_new_tokens=512,
    )


def probe_batch(model: PhiClipMLLM) -> dict:
    """One random image and a prompt: what both models run before anything is written."""
    size = model.vision_model.config.image_size
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return model.processor([f"Describe this image. {IMAGE_TOKEN}"], [image], add_generation_prompt=True)


def export_llava(
    checkpoint: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "5GB",
    check: bool = True,
    training_config: str | None = None,
) -> Path:
    """Write a transformers-native Llava directory of a checkpoint; returns it.

    The checkpoint is loaded in fp32 and LoRA merged in fp32; with `check`, the Llava's logits must match the model
    as trained on a probe input (to 1e-4 of the logit scale; 3% for 8bit) before anything is written. Then it is
    cast to `dtype` and saved.
    """
    out, checkpoint = Path(out), checkpoint_directory(checkpoint)  # a file inside a checkpoint means the checkpoint
    model = PhiClipMLLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    quantize, probe = model.config.quantize, probe_batch(model)
    with torch.no_grad():  # the reference is the model as trained: quantised, LoRA unmerged
        reference = model(**probe).logits.float() if check else None
    model = merge_and_dequantize(model)
    recipe = read_config_file(checkpoint / "config.json", "PhiClipMLLM")  # as trained, LoRA settings included
    llava = to_llava(model, torch.float32)
    if check:
        _check_same_logits(llava, probe, reference, quantize)
    processor, generation = llava_processor(model), generation_config(model)
    del model
    llava = llava.to(dtype)
    llava.generation_config = generation
    card = model_card(recipe, llava.config, dtype, training_config, checkpoint, str(out))  # before any write
    staging = out.with_name(out.name + ".incomplete")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with quiet_loading():
            llava.save_pretrained(staging, max_shard_size=max_shard_size)
            processor.save_pretrained(staging)
        (staging / "README.md").write_text(card)
    except BaseException:  # a full disk or Ctrl-C: leave no half-written directory beside --out
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()  # checked empty
    staging.rename(out)
    return out


def _check_same_logits(
    llava: LlavaForConditionalGeneration, probe: dict, reference: torch.Tensor, quantize: str | None
) -> None:
    """Raise unless the Llava's logits on the probe are the checkpoint's `reference`; say so when they are."""
    with torch.no_grad():
        difference = (llava(**probe).logits.float() - reference).abs().max().item()
    scale = reference.abs().max().item()
    # fp32 summation-order noise is far below 1e-4 of the logit scale. LLM.int8 (8bit) also rounds the activations
    # to 8 bits, which no plain weights reproduce: measured ~1% of the scale on tiny models.
    tolerance = (3e-2 if quantize == "8bit" else 1e-4) * max(1.0, scale)
    if not difference <= tolerance:
        why = " (LLM.int8 rounds activations, which plain weights cannot; --no_check writes it)"
        raise RuntimeError(
            f"the Llava's logits differ from the checkpoint's by {difference:.3g}{why if quantize == '8bit' else ''}: "
            "nothing written"
        )
    trained = f"{quantize} " if quantize else ""
    print(f"check: the Llava's logits equal the {trained}checkpoint's to {difference:.1e} (fp32)", file=sys.stderr)


def export_merged(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a standalone PhiClipMLLM checkpoint with LoRA merged into (and stored with) both backbones."""
    model = PhiClipMLLM.from_pretrained(checkpoint)
    with quiet_loading():
        return model.save_pretrained(out, merge_lora=True)


def model_card(
    recipe: dict, config: LlavaConfig, dtype: torch.dtype, training_config: str | None, checkpoint: Path, name: str
) -> str:
    """A short README.md: what the model is, how it was made, its evaluate.py figures when present, how to run it."""

    def backbone(key: str) -> str:
        source = recipe[key]
        if isinstance(source, dict):
            return f"an inline `{source['model_type']}` config (no pre-trained weights)"
        revision = recipe.get("revisions", {}).get(key)
        text = f"`{source}`" + (f" at revision `{revision}`" if revision else "")
        return text + (" (stored in the checkpoint)" if key in recipe.get("saved_backbones", []) else "")

    lines = [
        f"# {Path(name).name}",
        "",
        "A LLaVA-style model trained with PhiClipMLLM and exported as transformers' `LlavaForConditionalGeneration`",
        "(no custom code)"
        + (", with its LoRA merged." if recipe.get("lora_text") or recipe.get("lora_vision") else "."),
        "",
        f"- vision: {backbone('vision_model')}, stopped after {config.vision_config.num_hidden_layers} layers "
        f"(the feature layer), {'CLS kept' if recipe.get('keep_cls', True) else 'CLS dropped'}: "
        f"{config.image_seq_length} image tokens per image",
        f"- language model: {backbone('text_model')}",
        f"- adapter: {_adapter_text(recipe)}, written as Llava's projector ({config.projector_hidden_act})",
        f"- prompt format: `{recipe.get('prompt_format', 'chat')}`; the image token is `{IMAGE_TOKEN}`",
        f"- weights: {str(dtype).removeprefix('torch.')} safetensors",
    ]
    for label, settings in (("LM", recipe.get("lora_text")), ("vision", recipe.get("lora_vision"))):
        if settings:
            lines.append(f"- {label} LoRA (merged): " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    if training_config:
        lines += _training_lines(training_config)
    metrics = sorted(checkpoint.glob("metrics_*.json"))
    if metrics:
        lines += ["", "## Evaluation (evaluate.py)", ""]
        for path in metrics:
            try:
                values = json.loads(path.read_text())
            except (OSError, ValueError):
                values = None
            if not isinstance(values, dict):  # e.g. evaluate.py killed while writing it
                print(f"warning: {path}: not a metrics JSON object; left out of the model card", file=sys.stderr)
                continue
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
            lines.append(f"- {path.stem.removeprefix('metrics_')}: {shown}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{name}")',
        f'processor = AutoProcessor.from_pretrained("{name}")',
        'messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},',
        '                                          {"type": "image", "url": "photo.jpg"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        '                                       return_dict=True, return_tensors="pt")',
        'answer = model.generate(**inputs)[0, inputs["input_ids"].shape[1] :]',
        "print(processor.decode(answer, skip_special_tokens=True))",
        "```",
        "",
        f"Serve it with `transformers serve` (requests name `{name}` as their model) or `vllm serve {name}`",
        "(OpenAI-compatible chat completions).",
        "",
    ]
    return "\n".join(lines)


def _adapter_text(recipe: dict) -> str:
    if recipe.get("adapter_dim", 1024) is None:
        return "one Linear layer"
    return f"Linear -> {recipe.get('adapter_activation', 'gelu')} -> Linear, hidden width {recipe['adapter_dim']}"


def _training_lines(path: str) -> list[str]:
    config = load_config(path, check_paths=False)
    args = config["training_args"]
    lines = ["", f"## Training (as configured in {Path(path).name})", ""]
    for split in ("train", "val"):
        for source in data_sources(config["data"][split]):  # one source, or a list mixed into one set
            where = source.get("annotation_file") or source.get("data_dir")
            lines.append(f"- {split} data: {source.get('format', '(no format)')} `{where}`")
    length = f"{args['max_steps']} steps" if args["max_steps"] > 0 else f"{args['num_train_epochs']:g} epoch(s)"
    lines.append(
        f"- {length}, batch {args['batch_size']} x {args['gradient_accumulation_steps']} accumulation, "
        f"learning rate {args['learning_rate']:g} ({args['lr_scheduler']}), dtype {config['dtype']}"
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Command line: write the export and say where it went."""
    args = command_line().parse_args(argv)
    check_arguments(args)
    try:
        if args.format == "phiclip":
            out = export_merged(checkpoint_directory(args.checkpoint), Path(args.out).expanduser())
        else:
            out = export_llava(
                checkpoint_directory(args.checkpoint),
                Path(args.out).expanduser(),
                torch_dtype(args.dtype),
                args.max_shard_size,
                check=not args.no_check,
                training_config=args.config,
            )
    except (ValueError, FileNotFoundError) as error:  # as generate.py: a LoRA directory the checkpoint lacks
        fail(str(error))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
