"""Benchmarks: PhiClipMLLM against transformers' LlavaForConditionalGeneration, same architecture, same weights.

    python bench.py [--json] [--out FILE]   CPU, one run (90 s idle, up to 5 min busy): train steps, generation, data pipeline
    python bench.py --gpu [--out FILE]      real-scale Phi-3-mini-4k + CLIP-L/14, random weights, bf16, on a GPU
    python bench.py --gpu --tiny            the GPU code path at a tiny size (runs on a CPU too; for tests)

Both models compute the same function: a Llava-shaped config (feature layer -2, no CLS, adapter width = text width,
no normalisation), checked by comparing losses first. The peer runs every vision layer and full-vocabulary logits;
ours stops the tower at the feature layer and projects only supervised positions. Method and figures: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys


def command_line() -> argparse.ArgumentParser:
    """bench.py's arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON (progress goes to stderr)")
    parser.add_argument("--gpu", action="store_true", help="real-scale training benchmark on a GPU")
    parser.add_argument("--tiny", action="store_true", help="with --gpu: tiny configs (a smoke test, CPU is fine)")
    parser.add_argument("--budget", type=float, default=450.0, help="with --gpu: seconds; late rows fit in it or skip")
    parser.add_argument("--out", help="also write the JSON results to this file (--gpu: and the table beside it, .txt)")
    return parser


if __name__ == "__main__":
    command_line().parse_args(sys.argv[1:])  # --help and bad arguments answer here, before torch loads

import json  # the heavy imports follow the early argument check above
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_pair import (
    CPU_TEXT,
    CPU_VISION,
    PLAIN,
    REAL_TEXT,
    REAL_VISION,
    TINY_TEXT,
    TINY_VISION,
    batch_stats,
    build_pair,
    checkpointed_modules,
    flops,
    interleaved,
    lever,
    lora_settings,
    make_batch,
    make_step,
    random_image,
    ratio,
    set_phase,
    split,
    trainer_against_bench,
    unset_lora,
    write_training_config,
)
from dataset import CAPTION_INSTRUCTIONS
from generate import generate
from model import IMAGE_TOKEN
from processor import PhiClipProcessor

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"

__all__ = [  # the shared pieces are bench_pair.py's; tests and notebooks reach them through here too
    "CPU_TEXT",
    "CPU_VISION",
    "PLAIN",
    "REAL_TEXT",
    "REAL_VISION",
    "TINY_TEXT",
    "TINY_VISION",
    "batch_stats",
    "build_pair",
    "checkpointed_modules",
    "flops",
    "interleaved",
    "lever",
    "lora_settings",
    "make_batch",
    "make_step",
    "random_image",
    "ratio",
    "set_phase",
    "split",
    "trainer_against_bench",
    "unset_lora",
    "write_training_config",
    "bench_train",
    "bench_generate",
    "bench_data",
    "bench_cpu",
    "main",
]


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

    config = {
        "format": "coco",
        "annotation_file": str(coco / "annotations" / "captions_val2017.json"),
        "image_directory": str(coco / "images" / "val2017"),
        "captions_per_image": "all",
    }
    dataset_log = logging.getLogger("dataset")
    level = dataset_log.level
    dataset_log.setLevel(logging.ERROR)  # the annotation file names 5000 images; 12 ship: not news here
    try:
        records = list(make_dataset(config).records)
    finally:
        dataset_log.setLevel(level)  # a caller's own dataset warnings stay visible
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


def bench_cpu(
    text=CPU_TEXT, vision=CPU_VISION, repeats=9, gen_repeats=9, data_samples=96, trainer_steps=10, say=print
) -> dict:
    """The CPU run: train steps and generation against the peer, data pipeline, train.py against the bench step."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, peer = build_pair(text, vision, Path(tmp))
        trainer_config = write_training_config(Path(tmp), ours.config, "float32", batch_size=4, logging_steps=10)
        trainer_row = trainer_against_bench(trainer_config, trainer_steps, 2, say=say) if trainer_steps else None
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
    result["train_py"] = trainer_row  # train.py itself, fp32, batch 4, same model: steady-state samples/s
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


# ------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> dict:
    """Command line: the CPU run, or with --gpu bench_gpu.py's; prints (and with --out writes) the results."""
    args = command_line().parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout
    say = lambda *a: print(*a, file=stream, flush=True)  # noqa: E731
    start = time.perf_counter()
    if args.gpu:
        from bench_gpu import bench_gpu, gpu_table  # the real-scale GPU run lives in its own file (no circle)

        result = bench_gpu(args.tiny, args.budget, say=say)
        table = gpu_table(result)
        say(table)
        if args.out:
            Path(args.out).with_suffix(".txt").write_text(table + "\n")
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
