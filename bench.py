"""Benchmarks: PhiClipMLLM against transformers' LlavaForConditionalGeneration, same architecture, same weights.

    python bench.py [--json] [--out FILE]   CPU, one run (2-3 minutes): train steps, generation, data pipeline
    python bench.py --gpu [--out FILE]      real-scale Phi-3-mini-4k + CLIP-L/14, random weights, bf16, on a GPU
    python bench.py --gpu --tiny            the GPU code path at a tiny size (runs on a CPU too; for tests)

Both models compute the same function: a Llava-shaped config (feature layer -2, no CLS, adapter width = text width,
no normalisation), checked by comparing losses first. The peer runs every vision layer and full-vocabulary logits;
ours stops the tower at the feature layer and projects only supervised positions. Method and figures: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dataset import CAPTION_INSTRUCTIONS, build_word_tokenizer
from dry_run import KNOWN_ARCHITECTURES
from generate import generate
from model import CONTIGUOUS_VALUE_SDPA, IMAGE_TOKEN, PhiClipConfig, PhiClipMLLM, PhiClipProcessor

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"

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
        max_length=1024,
    )
    torch.manual_seed(0)
    with torch.device(device):
        ours = PhiClipMLLM(config, dtype=dtype)
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
        peer.model.vision_tower = get_peft_model(peer.model.vision_tower, tower)
        peer.model.language_model = get_peft_model(peer.model.language_model, LoraConfig(**text_lora))
    peer.model.multi_modal_projector.requires_grad_(True)
    counts = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, peer)]
    assert counts[0] == counts[1], f"trainable sets differ: ours {counts[0]}, peer {counts[1]}"
    return counts[0]


def unset_lora(ours: PhiClipMLLM, peer) -> None:
    for owner, names in ((ours, ("text_model", "vision_model")), (peer.model, ("language_model", "vision_tower"))):
        for name in names:
            if hasattr(getattr(owner, name), "unload"):
                setattr(owner, name, getattr(owner, name).unload())


def set_checkpointing(modules, on: bool) -> None:
    for module in modules:
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        if on:
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
            base.disable_input_require_grads()  # enabling added an embedding-output hook


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
            ours.enable_gradient_checkpointing() if who == "ours" else set_checkpointing(backbones, True)
        yield model
    finally:
        for part in parts:
            part.set_attn_implementation(_attention(ours, part, "sdpa"))
        if checkpointing:
            set_checkpointing(backbones, False)


def _attention(ours, part, attn: str) -> str:
    # "sdpa" for our LM means model.py's default, SDPA handed a contiguous value; PLAIN is the stock kernel.
    if attn == PLAIN:
        return "sdpa"
    return CONTIGUOUS_VALUE_SDPA if attn == "sdpa" and part is ours.text_model else attn


def random_image(seed: int, size: int = 224) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size + 32, size + 48, 3), dtype=np.uint8))


def make_batch(model: PhiClipMLLM, batch_size: int, device="cpu") -> dict[str, torch.Tensor]:
    prompts = [f"{CAPTION_INSTRUCTIONS[i % len(CAPTION_INSTRUCTIONS)]} {IMAGE_TOKEN}" for i in range(batch_size)]
    answers = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    size = model.vision_model.config.image_size
    batch = model.processor(prompts, [random_image(i, size) for i in range(batch_size)], answers)
    return {k: v.to(device) for k, v in batch.items()}


def batch_stats(batch: dict, n_image: int) -> dict:
    tokens = batch["attention_mask"].sum(1).float()
    return {
        "tokens_per_sample": tokens.mean().item(),
        "text_tokens_per_sample": tokens.mean().item() - n_image,
        "supervised_per_sample": (batch["labels"][:, 1:] != -100).sum().item() / len(tokens),
        "padded_length": batch["input_ids"].shape[1],
    }


def make_step(model, batch: dict):
    """One training step (forward + backward + AdamW) over the model's trainable parameters."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()  # both take input_ids, attention_mask, pixel_values, labels
        optimizer.step()

    return step, optimizer


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


def resident_bytes(model, optimizer=None) -> int:
    """Bytes of the distinct storages behind parameters, buffers, gradients and optimizer state."""
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters() if p.grad is not None)]
    if optimizer is not None:
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def cpu_step_peak_bytes(fn) -> int:
    """Peak of (allocated - freed) bytes through torch's CPU allocator during fn, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def ratio(a: float, b: float) -> float:
    return round(a / b, 4)


def bench_train(ours, peer, batch: dict, phase: str, repeats: int = 9) -> dict:
    """CPU: interleaved step times (ours, ours with stock SDPA, peer), then each one's peak memory in a step."""
    models = {"ours": ours, "ours+plain_sdpa": ours, "peer": peer}
    steps = {name: make_step(model, batch) for name, model in models.items()}

    def plain_step(step=steps["ours+plain_sdpa"][0]):
        with lever(ours, peer, "ours", phase, attn=PLAIN):  # a config flag: well under a millisecond
            step()

    steps["ours+plain_sdpa"] = (plain_step, steps["ours+plain_sdpa"][1])
    times = interleaved({k: s[0] for k, s in steps.items()}, repeats, warmup=2)
    result = {}
    for name, (step, optimizer) in steps.items():
        optimizer.zero_grad(set_to_none=True)  # resting state: weights + optimizer state, no gradients
        rest = resident_bytes(models[name], optimizer)
        result[name] = {
            "median_s": statistics.median(times[name]),
            "times_s": [round(t, 4) for t in times[name]],
            "resting_mb": rest / 2**20,
            "peak_mb": (rest + cpu_step_peak_bytes(step)) / 2**20,
        }
    for name in ("ours", "ours+plain_sdpa"):
        result[f"{name}_time_ratio"] = ratio(result[name]["median_s"], result["peer"]["median_s"])
        # per-round ratios of back-to-back steps: robust to load that comes and goes during the run
        result[f"{name}_paired_time_ratio"] = round(statistics.median(map(ratio, times[name], times["peer"])), 4)
        result[f"{name}_memory_ratio"] = ratio(result[name]["peak_mb"], result["peer"]["peak_mb"])
    return result


def bench_generate(ours, peer, batch_sizes=(1, 8), new_tokens: int = 32, repeats: int = 5) -> dict:
    """Greedy tokens/s, exactly `new_tokens` new tokens: generate() vs processor + llava.generate + decode."""
    images = [random_image(100 + i, ours.vision_model.config.image_size) for i in range(max(batch_sizes))]
    prompts = [f"{CAPTION_INSTRUCTIONS[i % len(CAPTION_INSTRUCTIONS)]} {IMAGE_TOKEN}" for i in range(len(images))]
    ours.text_model.generation_config.min_new_tokens = new_tokens  # no early stop: both produce new_tokens each
    processor, results = ours.processor, {}
    peer.eval()

    def peer_generate(b):
        batch = processor(prompts[:b], images[:b], padding_side="left", add_generation_prompt=True)
        with torch.no_grad():
            out = peer.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=processor.stop_token_ids,
                pad_token_id=processor.pad_token_id,
            )
        assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
        return [t.strip() for t in processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], True)]

    for b in batch_sizes:
        fns = {
            "ours": lambda b=b: generate(ours, prompts[:b], images[:b], max_new_tokens=new_tokens),
            "peer": lambda b=b: peer_generate(b),
        }
        same = fns["ours"]() == fns["peer"]()  # also the warm-up
        times = interleaved(fns, repeats, warmup=0)
        tps = {k: b * new_tokens / statistics.median(v) for k, v in times.items()}
        results[f"batch_{b}"] = {
            "ours_tokens_s": tps["ours"],
            "peer_tokens_s": tps["peer"],
            "same_text": same,
            "ratio": ratio(tps["ours"], tps["peer"]),
            "times_s": times,
            "paired_ratio": statistics.median(map(ratio, times["peer"], times["ours"])),
        }
    ours.text_model.generation_config.min_new_tokens = None
    return results


def bench_data(processor, workers=(0, 2), samples: int = 96, batch_size: int = 8, repeats: int = 3) -> dict:
    """Samples/s of load + preprocess + collate over the real COCO images (dataset.py's reader and Collator)."""
    coco = SHARED / "coco"
    if not (coco / "images" / "val2017").is_dir():
        return {"skipped": f"{coco} not present"}
    from dataset import Collator, ConversationDataset, make_dataloader, make_dataset

    logging.getLogger("dataset").setLevel(logging.ERROR)  # the annotation file names 5000 images; 12 ship
    config = {
        "format": "coco",
        "annotation_file": str(coco / "annotations" / "captions_val2017.json"),
        "image_directory": str(coco / "images" / "val2017"),
        "captions_per_image": "all",
    }
    records = make_dataset(config).records
    dataset = ConversationDataset((records * (samples // len(records) + 1))[:samples])
    result = {"images": len({r.images for r in records}), "samples": samples, "batch_size": batch_size}
    for n in workers:
        times = []
        for r in range(repeats):
            loader = make_dataloader(dataset, Collator(processor), batch_size=batch_size, num_workers=n, seed=r)
            start = time.perf_counter()
            assert sum(len(batch["input_ids"]) for batch in loader) == samples
            times.append(time.perf_counter() - start)
        result[f"workers_{n}_samples_s"] = samples / statistics.median(times)
    return result


def bench_cpu(text=CPU_TEXT, vision=CPU_VISION, repeats=9, gen_repeats=9, data_samples=96, say=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ours, peer = build_pair(text, vision, Path(tmp))
    n_image, used = ours.num_image_tokens, ours.config.vision_feature_layer
    batch = make_batch(ours, 4)
    stats = batch_stats(batch, n_image)
    n_text, n_supervised = stats["text_tokens_per_sample"], stats["supervised_per_sample"]
    result = {
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "busy_before": _cpu_busy(),
        "batch": stats,
        "flop_split": {
            "real_peer": split(flops(REAL_TEXT, REAL_VISION, 33, 257)),
            "bench_peer": split(flops(text, vision, n_text, n_image)),
            "bench_ours": split(flops(text, vision, n_text, n_image, n_supervised, used)),
        },
    }
    say(f"{result['cpu']}, {result['threads']} threads, {result['busy_before']:.0%} busy before; batch 4: {stats}")
    if result["busy_before"] > 0.1:
        say("WARNING: the CPU is busy with other work; timings will be noisy (ratios are interleaved, so less so)")
    for key, value in result["flop_split"].items():
        say(f"phase-one FLOPs per sample, {key}: {value}")
    with torch.no_grad():
        losses = [m.eval()(**batch).loss.item() for m in (ours, peer)]
    result["loss_check"] = {"ours": losses[0], "peer": losses[1]}
    say(f"same function: loss ours {losses[0]:.6f} peer {losses[1]:.6f}")
    result["generation"] = bench_generate(ours, peer, repeats=gen_repeats)
    for key, row in result["generation"].items():
        say(
            f"generate {key}: ours {row['ours_tokens_s']:.1f} tok/s, peer {row['peer_tokens_s']:.1f}, "
            f"ratio {row['ratio']:.3f} (paired {row['paired_ratio']:.3f}), same text {row['same_text']}"
        )
    for phase in ("one", "two"):
        trainable = set_phase(ours, peer, phase, lora_settings(text, vision))
        row = result[f"train_phase_{phase}"] = bench_train(ours, peer, batch, phase, repeats) | {"trainable": trainable}
        say(
            f"train phase {phase}, {trainable} trainable: "
            + ", ".join(
                f"{k} {row[k]['median_s']:.4f} s {row[k]['peak_mb']:.1f} MB"
                for k in ("ours", "ours+plain_sdpa", "peer")
            )
        )
        for k in ("ours", "ours+plain_sdpa"):
            say(
                f"  {k} / peer: time {row[f'{k}_time_ratio']:.3f} (paired {row[f'{k}_paired_time_ratio']:.3f}), "
                f"peak memory {row[f'{k}_memory_ratio']:.3f}"
            )
    data_processor = ours.processor
    if (SHARED / "phi3_tokenizer").is_dir():  # the real tokenizer for the data pipeline, when present
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(SHARED / "phi3_tokenizer")
        data_processor = PhiClipProcessor(tokenizer, ours.image_processor, n_image, "chat", 1024)
    result["data"] = bench_data(data_processor, samples=data_samples)
    result["load_average_after"] = os.getloadavg()  # includes this benchmark's own threads
    say(f"data pipeline: {result['data']}; load average after {result['load_average_after']}")
    return result


def _cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of the CPUs busy over `seconds` (from /proc/stat): other work running beside the benchmark."""
    if not Path("/proc/stat").exists():
        return float("nan")
    samples = []
    for _ in range(2):
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        samples.append((fields[3] + fields[4], sum(fields)))
        time.sleep(seconds)
    return round(1 - (samples[1][0] - samples[0][0]) / max(1, samples[1][1] - samples[0][1]), 3)


def _cpu_name() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")


# --------------------------------------------------------------------------------------------------- GPU
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    parser.add_argument("--gpu", action="store_true", help="real-scale training benchmark on a GPU")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: tiny configs (a smoke test, CPU is fine)")
    parser.add_argument("--budget", type=float, default=300.0, help="with --gpu: seconds; compile levers fit in it")
    parser.add_argument("--out", help="also write the JSON results to this file")
    args = parser.parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout
    say = lambda *a: print(*a, file=stream, flush=True)  # noqa: E731
    start = time.perf_counter()
    if args.gpu:
        from bench_gpu import bench_gpu, gpu_table  # the real-scale GPU run lives in its own file

        result = bench_gpu(args.tiny, args.budget, say=say)
        say(gpu_table(result))
    else:
        result = bench_cpu(say=say)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
