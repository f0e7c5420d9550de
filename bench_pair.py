"""The pair bench.py and bench_gpu.py measure: a Llava-shaped PhiClipMLLM and transformers' Llava with its weights.

Also what both benchmarks share: the real, CPU-scale and tiny architectures, analytic FLOPs, the trainable sets of
each phase, the switchable settings (attention kernel, checkpointing), batches, training steps and interleaved timing.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from transformers import TrainerCallback

from config import KNOWN_ARCHITECTURES
from dataset import CAPTION_INSTRUCTIONS
from model import (
    CONTIGUOUS_VALUE_SDPA,
    IMAGE_TOKEN,
    PhiClipConfig,
    PhiClipMLLM,
    quiet_loading,
    set_activation_checkpointing,
)
from processor import build_word_tokenizer
from training_config import RECORDED_KEYS

# The real architectures, as --dry_run knows them (token ids dropped: the scaled configs shrink the vocabulary).
REAL_TEXT = {k: v for k, v in KNOWN_ARCHITECTURES["microsoft/Phi-3-mini-4k-instruct"].items() if "token_id" not in k}
REAL_VISION = dict(KNOWN_ARCHITECTURES["openai/clip-vit-large-patch14"])
# Scaled down keeping the real FLOP split (flops()): head dims 96 / 64 as Phi-3 / CLIP, 224 px at patch 14.
CPU_TEXT = {
    **REAL_TEXT,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1088,
    "max_position_embeddings": 512,
}
CPU_VISION = {
    **REAL_VISION,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
}
TINY_TEXT = {
    **CPU_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 640,
}
TINY_VISION = {**CPU_VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "image_size": 56}
CAPTIONS = [
    "A man riding a brown horse along a sandy beach next to the ocean waves at sunset.",
    "Two young children are flying a red kite in a large green park on a windy day.",
    "A plate with a sandwich, some fries and a glass of orange juice on a wooden table.",
    "A yellow city bus is parked on the side of a busy street near a tall building.",
]
PLAIN = "sdpa_plain"  # transformers' stock SDPA for our LM, without model.py's contiguous-value fix


def lora_settings(text: dict, vision: dict) -> tuple[dict, dict]:
    """Phi-3 qkv_proj/o_proj and CLIP q/v/out_proj; rank scaled as r=64 is to the real widths (3072, 1024)."""
    r_text, r_vision = max(4, text["hidden_size"] // 48), max(4, vision["hidden_size"] // 16)
    common = {"lora_dropout": 0.0}
    return (
        {"r": r_text, "lora_alpha": 2 * r_text, "target_modules": ["qkv_proj", "o_proj"], **common},
        {"r": r_vision, "lora_alpha": 2 * r_vision, "target_modules": ["q_proj", "v_proj", "out_proj"], **common},
    )


def flops(
    text: dict,
    vision: dict,
    n_text: float,
    n_image: int,
    n_supervised: float | None = None,
    vision_layers: int | None = None,
    phase: str = "one",
) -> dict[str, float]:
    """Analytic training FLOPs of one sample (2 per multiply-add), by part.

    Backbones are frozen in both phases, so the LM costs forward + input gradients (2x forward); the vision tower
    costs its forward in phase one and 2x that in phase two (gradients for its LoRA). LoRA's own FLOPs (<1%) are not
    counted. `n_supervised=None` is Llava's lm_head over every position; `vision_layers=None` is every layer.
    """
    d, inter, layers, vocab = (text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    dv, iv, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    lv = vision_layers or vision["num_hidden_layers"]
    t, patches = n_text + n_image, (vision["image_size"] // patch) ** 2
    tv = patches + 1
    vision_forward = lv * (2 * tv * (4 * dv * dv + 2 * dv * iv) + 4 * tv * tv * dv) + 2 * patches * 3 * patch**2 * dv
    return {
        "lm_layers": 2 * layers * (2 * t * (4 * d * d + 3 * d * inter) + 4 * t * t * d),
        "vision": vision_forward * (1 if phase == "one" else 2),
        "adapter": 3 * 2 * n_image * (dv * d + d * d),
        "lm_head": 2 * 2 * (t if n_supervised is None else n_supervised) * d * vocab,
    }


def split(parts: dict[str, float]) -> dict:
    """FLOPs by part as percentages of their total (GFLOP)."""
    total = sum(parts.values())
    return {"total_gflop": round(total / 1e9, 2), **{k: round(100 * v / total, 2) for k, v in parts.items()}}


# --------------------------------------------------------------------------------------------------- models
def build_pair(text: dict, vision: dict, workdir: Path, dtype=None, device="cpu"):
    """A Llava-shaped PhiClipMLLM and a LlavaForConditionalGeneration sharing its (frozen) backbone weights."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    chats = [
        f"<|user|>\n{i} {IMAGE_TOKEN}<|end|>\n<|assistant|>\n{c}<|end|>\n"
        for i in CAPTION_INSTRUCTIONS
        for c in CAPTIONS
    ]
    build_word_tokenizer(chats, vocab_size=min(600, text["vocab_size"])).save_pretrained(workdir / "tokenizer")
    config = PhiClipConfig(
        text_model=dict(text),
        vision_model=dict(vision),
        tokenizer=str(workdir / "tokenizer"),
        adapter_dim=text["hidden_size"],
        vision_feature_layer=-2,
        keep_cls=False,
        normalize=False,
    )
    torch.manual_seed(0)
    ours = PhiClipMLLM(config, dtype=dtype, device=device)  # random backbones initialised on the device
    with torch.device(device):
        llava_config = LlavaConfig(
            vision_config=CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"}),
            text_config=copy.deepcopy(ours.text_model.config),
            image_token_id=ours.image_token_id,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=ours.num_image_tokens,
        )
        peer = LlavaForConditionalGeneration._from_config(llava_config, dtype=dtype, attn_implementation="sdpa")
    ours, peer = ours.to(device), peer.to(device)
    # assign=True shares storage: one copy of the frozen weights. Llava's last vision layer (unused) stays its own.
    _, unexpected = peer.model.vision_tower.load_state_dict(ours.vision_model.state_dict(), strict=False, assign=True)
    assert not unexpected, unexpected
    peer.model.language_model.load_state_dict(ours.text_model.get_decoder().state_dict(), assign=True)
    peer.lm_head.load_state_dict(ours.text_model.get_output_embeddings().state_dict(), assign=True)
    projector = peer.model.multi_modal_projector  # copied, not shared: each model trains its own
    for i, linear in ((0, projector.linear_1), (2, projector.linear_2)):
        linear.load_state_dict({k: v.clone() for k, v in ours.vision_adapter.layers[i].state_dict().items()})
    return ours, peer


def set_phase(ours: PhiClipMLLM, peer, phase: str, lora: tuple[dict, dict] | None = None) -> int:
    """Give both models the same trainable set; returns its size (asserted equal)."""
    from peft import LoraConfig, get_peft_model

    peer.requires_grad_(False)
    if phase == "one":
        ours.prime_model("one")
    else:
        text_lora, vision_lora = lora
        ours.setup_lora(text_lora, vision_lora)
        # Ours holds only the layers up to the feature layer; LoRA on Llava's unused last layer would get no gradient.
        used = list(range(ours.config.vision_feature_layer))
        tower = LoraConfig(**vision_lora, layers_to_transform=used, layers_pattern="layers")
        with quiet_loading():
            peer.model.vision_tower = get_peft_model(peer.model.vision_tower, tower)
            peer.model.language_model = get_peft_model(peer.model.language_model, LoraConfig(**text_lora))
    peer.model.multi_modal_projector.requires_grad_(True)
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, peer)]
    assert counts[0] == counts[1], f"trainable sets differ: ours {counts[0]}, peer {counts[1]}"
    return counts[0]


def unset_lora(ours: PhiClipMLLM, peer: torch.nn.Module) -> None:
    """Take LoRA off both models' backbones (unmerged: the frozen weights stay as built)."""
    for owner, names in ((ours, ("text_model", "vision_model")), (peer.model, ("language_model", "vision_tower"))):
        for name in names:
            if hasattr(getattr(owner, name), "unload"):
                setattr(owner, name, getattr(owner, name).unload())


def checkpointed_modules(model) -> list[str]:
    """Names of the modules that would recompute their activations in backward."""
    return [name for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False)]


@contextlib.contextmanager
def lever(ours, peer, who: str, phase: str, attn="sdpa", checkpointing=False):
    """One model switched to a setting (attention kernel, activation checkpointing), then back."""
    model = ours if who == "ours" else peer
    parts = [peer] if who == "peer" else [ours.text_model] + ([ours.vision_model] if attn == "eager" else [])
    backbones = [ours.text_model, ours.vision_model] if who == "ours" else [peer.model.language_model]
    backbones += [peer.model.vision_tower] if who == "peer" and phase == "two" else []
    try:
        for part in parts:
            part.set_attn_implementation(_attention(ours, part, attn))
        if checkpointing:
            if who == "ours":
                ours.enable_gradient_checkpointing()
            else:
                for backbone in backbones:
                    set_activation_checkpointing(backbone, True)
        yield model
    finally:
        for part in parts:
            part.set_attn_implementation(_attention(ours, part, "sdpa"))
        for backbone in backbones if checkpointing else ():
            set_activation_checkpointing(backbone, False)
    # A lever that leaves its setting behind would silently change every later row (issue 12: on transformers 5.17
    # checkpointing stayed on after its row, so ours' compiled and phase-two rows recomputed every layer).
    left_on = checkpointed_modules(ours) + checkpointed_modules(peer)
    assert not left_on, f"checkpointing left on after the {who} lever: {left_on[:3]}"


def _attention(ours, part, attn: str) -> str:
    # "sdpa" for our LM means model.py's default, SDPA handed a contiguous value; PLAIN is the stock kernel.
    if attn == PLAIN:
        return "sdpa"
    return CONTIGUOUS_VALUE_SDPA if attn == "sdpa" and part is ours.text_model else attn


def random_image(seed: int, size: int = 224) -> Image.Image:
    """Noise a little larger than `size` (the processor resizes and crops it), the same for the same seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size + 32, size + 48, 3), dtype=np.uint8))


def make_batch(model: PhiClipMLLM, batch_size: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A caption batch through the model's processor: instruction + image -> one of CAPTIONS."""
    prompts = [f"{CAPTION_INSTRUCTIONS[i % len(CAPTION_INSTRUCTIONS)]} {IMAGE_TOKEN}" for i in range(batch_size)]
    answers = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    size = model.vision_model.config.image_size
    batch = model.processor(prompts, [random_image(i, size) for i in range(batch_size)], answers)
    return {k: v.to(device) for k, v in batch.items()}


def batch_stats(batch: dict, n_image: int) -> dict:
    """Tokens per sample (all, text only, supervised) and the padded length: what flops() is fed."""
    tokens = batch["attention_mask"].sum(1).float()
    return {
        "tokens_per_sample": tokens.mean().item(),
        "text_tokens_per_sample": tokens.mean().item() - n_image,
        "supervised_per_sample": (batch["labels"][:, 1:] != -100).sum().item() / len(tokens),
        "padded_length": batch["input_ids"].shape[1],
    }


def write_training_config(workdir: Path, model_config: PhiClipConfig, dtype: str, images: int = 64, **args) -> Path:
    """A train.py config for this model over a synthetic COCO-format set (random images, CAPTIONS) in workdir.

    The benchmark's training step and the train.py row both read it, so both run one precision policy. `args` are
    training_args keys (batch_size, max_steps, torch_compile, ...).
    """
    workdir = Path(workdir)
    size = (model_config.vision_model or {}).get("image_size", 224)
    (workdir / "images").mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": []}
    for i in range(images):
        random_image(1000 + i, size).save(workdir / "images" / f"{i:06d}.png")
        coco["images"].append({"id": i, "file_name": f"{i:06d}.png", "width": size + 48, "height": size + 32})
        coco["annotations"].append({"id": i, "image_id": i, "caption": CAPTIONS[i % len(CAPTIONS)]})
    (workdir / "captions.json").write_text(json.dumps(coco))
    config = {
        "dtype": dtype,
        "model": {k: v for k, v in model_config.to_dict().items() if k not in RECORDED_KEYS},  # a fresh model's
        "checkpoint": {"output_dir": str(workdir / "output")},
        "data": {
            "train": {
                "format": "coco",
                "annotation_file": str(workdir / "captions.json"),
                "image_directory": str(workdir / "images"),
            },
            "num_workers": 0,
            "eval_captions": 0,
        },
        "training_args": {"eval_steps": None, "save_steps": 10**6, "report_to": "none", "warmup_steps": 0} | args,
    }
    path = workdir / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_step(model, batch: dict, config: dict | None = None):
    """One optimizer step as train.py's Trainer takes it; returns (step, optimizer).

    The step is transformers' Trainer loop for one batch, through train.py's own PhiClipTrainer and TrainingArguments
    (`config`: a loaded train.py config; default: its defaults at the model's weight dtype): training_step, whose
    forward runs under accelerate's mixed precision (bf16 autocast: the fp32 adapter and LoRA weights run bf16
    matmuls), the loss check that syncs the host each step, gradient clipping, AdamW, the LR schedule.
    """
    from trainer import PhiClipTrainer, training_arguments

    if config is None:
        dtype = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)  # the backbones'
        config = _default_config({torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"))
    args = training_arguments(config, config["checkpoint"]["output_dir"], report_to="none", disable_tqdm=True)
    trainer = PhiClipTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    wrapped, optimizer = trainer.accelerator.prepare(model, trainer.optimizer)  # wraps forward in autocast, once

    trainer.current_gradient_accumulation_steps = 1  # the loop sets it per step: the batches accumulated

    def step():
        _, items = trainer.get_batch_samples(iter([batch]), 1, args.device)  # supervised tokens, as the loop counts
        loss = trainer.training_step(wrapped, batch, items)
        assert not (torch.isnan(loss) or torch.isinf(loss))  # Trainer's logging_nan_inf_filter reads the loss too
        if args.max_grad_norm > 0:
            trainer.accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
        optimizer.step()
        trainer.lr_scheduler.step()
        wrapped.zero_grad()

    return step, optimizer


def _default_config(dtype: str) -> dict:
    from training_config import load_config

    directory = Path(tempfile.gettempdir()) / "phiclip-bench"
    directory.mkdir(exist_ok=True)
    path = directory / f"{dtype}.yaml"
    path.write_text(yaml.safe_dump({"dtype": dtype, "checkpoint": {"output_dir": str(directory / "output")}}))
    return load_config(path)


# ------------------------------------------------------------------------------------------- measurement
def interleaved(fns: dict, repeats: int, warmup: int = 1, sync=lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each fn, rotating which goes first each round (drift and load hit all alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times, names = {name: [] for name in fns}, list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(a: float, b: float) -> float:
    """a / b, rounded for the tables."""
    return round(a / b, 4)


# ------------------------------------------------------------------------------------------ train.py itself
class StepClock(TrainerCallback):
    """Wall-clock time at the end of each optimizer step of a Trainer run (after a device sync)."""

    def __init__(self, sync=lambda: None):
        self.sync, self.began, self.ends = sync, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.ends.append(time.perf_counter())


def trainer_against_bench(config_path: Path, steps: int, warmup: int, overrides=(), say=print) -> dict:
    """train.py itself (`train.run_training`, phase one) for warmup + steps optimizer steps, and the benchmark's step
    (make_step) on train.py's own model (`train.build_model`) and a batch of its data: steady-state samples/s of each.

    Steady state is the median of the step intervals after `warmup` steps, so a recompile or a slow batch in the
    timed steps does not move it. `overrides` are train.py `--set` values (e.g. training_args.torch_compile=true).
    """
    import train
    from dataset import Collator, make_dataset
    from training_config import load_config

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    config = load_config(config_path, [*overrides, f"training_args.max_steps={warmup + steps}"], phase="one")
    batch_size = config["training_args"]["batch_size"]
    started = time.perf_counter()
    model = train.build_model(config, "one")
    built = time.perf_counter() - started
    dataset = make_dataset(config["data"]["train"], seed=config["seed"])
    batch = Collator(model.processor)([dataset[i] for i in range(batch_size)])
    step, _ = make_step(model, batch, config)
    times = interleaved({"bench": step}, steps, warmup, sync)["bench"]
    bench_samples_s = batch_size / statistics.median(times)
    del model, step
    gc.collect()  # the step's Trainer holds the model in reference cycles
    if cuda:
        torch.cuda.empty_cache()
    clock, started = StepClock(sync), time.perf_counter()
    train.run_training(config, "one", callbacks=[clock])
    intervals = [b - a for a, b in zip(clock.ends[warmup - 1 :], clock.ends[warmup:])]
    trainer_samples_s = batch_size / statistics.median(intervals)
    row = {
        "overrides": list(overrides),
        "batch": batch_size,
        "steps": steps,
        "warmup": warmup,
        "model_build_s": round(built, 1),
        "train_py_until_first_step_s": round(clock.began - started, 1),
        "train_py_samples_s": round(trainer_samples_s, 2),
        "train_py_mean_samples_s": round(batch_size * len(intervals) / sum(intervals), 2),
        "bench_step_samples_s": round(bench_samples_s, 2),
        "train_py_over_bench": ratio(trainer_samples_s, bench_samples_s),
    }
    say(f"train.py {list(overrides) or 'as configured'}: {row}")
    return row
