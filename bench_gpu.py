"""The real-scale GPU half of bench.py: Phi-3-mini-4k + CLIP-L/14 with random weights, bf16, ours vs Llava.

python bench.py --gpu [--out FILE] [--budget SECONDS]     (python bench.py --gpu --tiny: the same path, tiny)
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_pair import (
    PLAIN,
    REAL_TEXT,
    REAL_VISION,
    TINY_TEXT,
    TINY_VISION,
    batch_stats,
    build_pair,
    flops,
    interleaved,
    lever,
    lora_settings,
    make_batch,
    make_step,
    set_phase,
    unset_lora,
)

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s of the card (datasheet)


def gpu_measure(model, batch: dict, step_flops: float, peak_flops, steps: int, warmup: int, other) -> dict:
    cuda = batch["input_ids"].is_cuda
    step, optimizer = make_step(model, batch)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = interleaved({"x": step}, steps, warmup, torch.cuda.synchronize if cuda else lambda: None)["x"]
    seconds, n = statistics.median(times), batch["input_ids"].shape[0]
    row = {
        "step_s": round(seconds, 4),
        "samples_s": round(n / seconds, 2),
        "tokens_s": round(batch["attention_mask"].sum().item() / seconds),
        "tflop_s": round(step_flops / seconds / 1e12, 1),
        "mfu": round(step_flops / seconds / peak_flops, 4) if peak_flops else None,
    }
    if cuda:
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        mine = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        theirs = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in other.parameters()}
        row["other_model_gb"] = round(sum(v for k, v in theirs.items() if k not in mine) / 1e9, 3)  # in peak_gb too
    optimizer.zero_grad(set_to_none=True)
    return row


def gpu_profile(model, batch: dict, top: int = 10) -> dict:
    """GPU kernel time of one step by kind, the top kernels, and the wall time (kernel gaps are host overhead)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step, optimizer = make_step(model, batch)
    step(), step(), torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step(), torch.cuda.synchronize()
        wall = time.perf_counter() - start
    optimizer.zero_grad(set_to_none=True)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    kinds = {"gemm": ("gemm", "cutlass", "xmma", "nvjet"), "attention": ("fmha", "flash", "attention", "sdpa")}
    by_kind = dict.fromkeys([*kinds, "other"], 0.0)
    for e in kernels:
        kind = next((k for k, words in kinds.items() if any(w in e.key.lower() for w in words)), "other")
        by_kind[kind] += e.self_device_time_total / 1e3
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {
        "wall_ms": round(wall * 1e3, 1),
        "kernel_ms": round(sum(by_kind.values()), 1),
        **{f"{k}_ms": round(v, 1) for k, v in by_kind.items()},
        "top": [(e.key[:90], round(e.self_device_time_total / 1e3, 2), e.count) for e in kernels[:top]],
    }


def bench_gpu(tiny: bool = False, budget_s: float = 300.0, say=print) -> dict:
    """Real scale (or tiny): phase one at batch 8, phase two at batch 4; levers: attention, checkpointing, compile."""
    import peft
    import transformers

    start, cuda = time.perf_counter(), torch.cuda.is_available()
    device, name = ("cuda", torch.cuda.get_device_name()) if cuda else ("cpu", "cpu")
    peak_flops = next((v for k, v in BF16_PEAK.items() if k in name), None)
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (REAL_TEXT, REAL_VISION)
    steps, warmup = (6, 2) if cuda else (2, 1)
    with tempfile.TemporaryDirectory() as tmp:
        ours, peer = build_pair(text, vision, Path(tmp), torch.bfloat16 if cuda else None, device)  # CPU: fp32 is fast
    result = {
        "device": name,
        "peak_bf16_flop_s": peak_flops,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "rows": [],
        "profiles": {},
        "config": "Llava-shaped (feature layer -2, no CLS, adapter_dim = text hidden, no normalize); bf16 "
        "weights, adapter fp32 (ours, as prime_model/setup_lora leave it), projector bf16 (peer)",
    }
    say(f"{name}: built in {time.perf_counter() - start:.0f} s")
    n_image, used, lora = ours.num_image_tokens, ours.config.vision_feature_layer, lora_settings(text, vision)
    batches = {"one": make_batch(ours, 8, device), "two": make_batch(ours, 4, device)}
    with torch.no_grad():
        result["loss_check"] = [m.eval()(**batches["one"]).loss.item() for m in (ours, peer)]
    for phase, batch in batches.items():
        stats = batch_stats(batch, n_image)
        per_sample = flops(
            text, vision, stats["text_tokens_per_sample"], n_image, stats["supervised_per_sample"], used, phase
        )
        result[f"phase_{phase}"] = {
            "batch": stats,
            "model_tflop_per_step": sum(per_sample.values()) * len(batch["input_ids"]) / 1e12,
        }

    def run(phase, who, compile=False, **setting):
        row = {
            "model": who,
            "phase": phase,
            "batch": len(batches[phase]["input_ids"]),
            "attn": "sdpa",
            "checkpointing": False,
            "compile": compile,
            **setting,
        }
        flop = result[f"phase_{phase}"]["model_tflop_per_step"] * 1e12
        try:
            with lever(ours, peer, who, phase, **setting) as model:
                row.update(
                    gpu_measure(model, batches[phase], flop, peak_flops, steps, warmup, peer if model is ours else ours)
                )
        except Exception as error:  # a lever that fails is reported, not fatal
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        result["rows"].append(row)
        say(json.dumps(row))

    def phase_setup(phase):
        result[f"phase_{phase}"]["trainable"] = set_phase(ours, peer, phase, lora)

    phase_setup("one")
    for who, setting in [
        ("ours", {}),
        ("peer", {}),
        ("ours", {"attn": PLAIN}),
        ("ours", {"checkpointing": True}),
        ("peer", {"checkpointing": True}),
        ("ours", {"attn": "eager"}),
        ("peer", {"attn": "eager"}),
    ]:
        run("one", who, **setting)
    if cuda:
        result["profiles"]["ours_one"] = gpu_profile(ours, batches["one"])
    phase_setup("two")
    for who, setting in [
        ("ours", {}),
        ("peer", {}),
        ("ours", {"attn": PLAIN}),
        ("ours", {"checkpointing": True}),
        ("peer", {"checkpointing": True}),
    ]:
        run("two", who, **setting)
    if cuda:
        result["profiles"]["ours_two"] = gpu_profile(ours, batches["two"])
    unset_lora(ours, peer)
    # Compiled decoder layers, one model at a time from a clean dynamo cache: both share Phi3DecoderLayer's code, so
    # one model's recompiles count against the other's limit. Llava's training-time DynamicCache recompiles every
    # layer (a guard on each cache layer), so the peer compiles with use_cache=False, as a careful user would.
    for who in ("ours", "peer") if cuda else ():
        if time.perf_counter() - start > budget_s - 100:
            say(f"torch.compile lever for {who} skipped: too little time left")
            continue
        torch._dynamo.reset()
        peer.model.language_model.config.use_cache = who == "ours"
        for layer in (ours.text_model.get_decoder() if who == "ours" else peer.model.language_model).layers:
            layer.compile()
        phase_setup("one")
        for setting in [{}, {"attn": PLAIN}] if who == "ours" else [{}]:
            run("one", who, compile=True, **setting)
        phase_setup("two")  # LoRA goes into the compiled layers: they recompile
        run("two", who, compile=True)
        unset_lora(ours, peer)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def gpu_table(result: dict) -> str:
    lines = [
        f"{result['device']}  torch {result['torch']}  transformers {result['transformers']}  peft {result['peft']}",
        "model phase batch attn          ckpt  compile  step_s  samples/s  tokens/s  TFLOP/s  MFU    peak_GB",
    ]
    for r in result["rows"]:
        head = (
            f"{r['model']:5} {r['phase']:5} {r['batch']:5} {r['attn']:13} {r['checkpointing']!s:5} {r['compile']!s:7}"
        )
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        lines.append(
            f"{head} {r['error']}"
            if "error" in r
            else f"{head} {r['step_s']:7.4f} {r['samples_s']:9.2f} "
            f"{r['tokens_s']:9d} {r['tflop_s']:8.1f}  {mfu:6} {r.get('peak_gb', '-')}"
        )
    for key, prof in result["profiles"].items():
        lines.append(f"profile {key}: " + json.dumps({k: v for k, v in prof.items() if k != "top"}))
        lines += [f"  {ms:8.2f} ms {count:5d}x  {kernel}" for kernel, ms, count in prof["top"]]
    return "\n".join(lines)
