"""The real-scale GPU half of bench.py: Phi-3-mini-4k + CLIP-L/14 with random weights, bf16, ours vs Llava.

python bench.py --gpu [--out DIR] [--budget SECONDS]     (python bench.py --gpu --tiny: the same path, tiny, any device)

Every row steps as train.py's Trainer does (bench_pair.make_step: bf16 autocast, clipping, AdamW). Ours and the peer
are timed interleaved where they are compared; the levers (attention kernel, checkpointing) run one model at a time.
The last rows run train.py itself, eager and compiled, each without and with liger-kernel (where installed), beside
the benchmark's step on the same model and data.
"""

from __future__ import annotations

import gc
import json
import shutil
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
    ratio,
    set_phase,
    trainer_against_bench,
    unset_lora,
    write_training_config,
)
from config import installed

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s of the card (datasheet)


def gpu_measure(models: dict, batch: dict, step_flops: float, peak_flops, steps: int, warmup: int) -> dict:
    """Interleaved step times of each model ({name: model}), then each one's peak memory in a step of its own."""
    cuda = batch["input_ids"].is_cuda
    sync = torch.cuda.synchronize if cuda else lambda: None
    made = {name: make_step(model, batch) for name, model in models.items()}
    times = interleaved({name: step for name, (step, _) in made.items()}, steps, warmup, sync)
    rows, n = {}, batch["input_ids"].shape[0]
    for name, (step, optimizer) in made.items():
        seconds = statistics.median(times[name])
        rows[name] = {
            "step_s": round(seconds, 4),
            "samples_s": round(n / seconds, 2),
            "tokens_s": round(batch["attention_mask"].sum().item() / seconds),
            "tflop_s": round(step_flops / seconds / 1e12, 1),
            "mfu": round(step_flops / seconds / peak_flops, 4) if peak_flops else None,
        }
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step(), sync()
            rows[name]["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)  # both models' weights
        optimizer.zero_grad(set_to_none=True)
    return rows


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
        "fp32_gemm_calls": sum(e.count for e in kernels if "f32f32" in e.key or "sgemm" in e.key.lower()),
        "top": [(e.key[:90], round(e.self_device_time_total / 1e3, 2), e.count) for e in kernels[:top]],
    }


def compile_pair(ours, peer, backend: str) -> None:
    """Ours as train.py compiles it; the peer's decoder layers the same way, without its training-time KV cache
    (Llava's DynamicCache makes dynamo recompile every layer), as a careful user would."""
    ours.compile_language_model(backend=backend)
    peer.model.language_model.config.use_cache = False
    for layer in peer.model.language_model.layers:
        layer.compile(backend=backend)


def bench_gpu(tiny: bool = False, budget_s: float = 450.0, say=print, trainer_compile: bool | None = None) -> dict:
    """Every acceptance row of issue 12 in one run: phase one (batch 8) and two (batch 4), ours and the peer
    interleaved, eager and compiled; the levers; profiles; train.py eager and compiled against the bench step.

    `trainer_compile`: run train.py's torch_compile row (default: at real scale on a GPU). Tiny, the compiled rows
    use dynamo's eager backend: a quick check that every row's code path runs (on a CPU, or on another version).
    """
    import peft
    import transformers

    start, cuda = time.perf_counter(), torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    result = {
        "device": name,
        "peak_bf16_flop_s": next((v for k, v in BF16_PEAK.items() if k in name), None),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "rows": [],
        "profiles": {},
        "skipped": [],
        "config": "Llava-shaped (feature layer -2, no CLS, adapter_dim = text hidden, no normalize); bf16 weights "
        "(ours' adapter and LoRA fp32 master weights), train.py's step: bf16 autocast, clipping, AdamW",
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    config = _pair_rows(tiny, workdir, result, lambda: budget_s - (time.perf_counter() - start), say)
    gc.collect()  # the pair's Trainers hold it in reference cycles
    if cuda:
        torch.cuda.empty_cache()  # the pair is gone: train.py builds its own model
    torch._dynamo.reset()
    trainer_steps, trainer_warmup = (30, 10) if cuda else (3, 2)
    # liger last: it patches transformers' Phi-3 module for the rest of the process (use_liger_kernels).
    for compiled, liger in ((False, False), (True, False), (False, True), (True, True)):
        left = budget_s - (time.perf_counter() - start)
        name = f"train.py torch_compile={compiled} use_liger_kernel={liger}"
        if compiled and not (cuda and not tiny if trainer_compile is None else trainer_compile):
            result["skipped"].append(f"{name}: tiny (inductor's compile would dominate)")
        elif liger and not (cuda and installed("liger_kernel")):
            result["skipped"].append(f"{name}: liger-kernel needs a CUDA GPU and `pip install liger-kernel`")
        elif cuda and left < (100 if compiled else 45):
            result["skipped"].append(f"{name}: {left:.0f} s left")
        else:
            overrides = [f"training_args.torch_compile={str(compiled).lower()}"]
            overrides += [f"training_args.use_liger_kernel={str(liger).lower()}"]
            overrides += [f"checkpoint.output_dir={workdir / f'train_{compiled}_{liger}'}"]
            overrides += ["data.num_workers=4"] if cuda else []
            try:
                row = trainer_against_bench(config, trainer_steps, trainer_warmup, overrides, say=say)
            except Exception as error:  # reported, not fatal
                row = {"error": f"{type(error).__name__}: {error}"[:300]}
            result.setdefault("train_py", []).append({"torch_compile": compiled, "use_liger_kernel": liger, **row})
    speed = {
        (r["torch_compile"], r["use_liger_kernel"]): r["train_py_samples_s"]
        for r in result.get("train_py", [])
        if "error" not in r
    }
    for key, (top, bottom) in {
        "train_py_compiled_over_eager": ((True, False), (False, False)),
        "train_py_liger_over_unfused_eager": ((False, True), (False, False)),
        "train_py_liger_over_unfused_compiled": ((True, True), (True, False)),
    }.items():
        if top in speed and bottom in speed:
            result[key] = ratio(speed[top], speed[bottom])
    shutil.rmtree(workdir, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _pair_rows(tiny: bool, workdir: Path, result: dict, left, say) -> Path:
    """The pair's rows into result; returns the train.py config of the same model (the pair is freed on return)."""
    cuda = torch.cuda.is_available()
    device, peak_flops = ("cuda" if cuda else "cpu"), result["peak_bf16_flop_s"]
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (REAL_TEXT, REAL_VISION)
    steps, warmup = (6, 2) if cuda else (2, 1)
    backend = "inductor" if cuda and not tiny else "eager"  # tiny: dynamo's tracing, without inductor's codegen
    started = time.perf_counter()
    ours, peer = build_pair(text, vision, workdir, torch.bfloat16 if cuda else None, device)  # CPU: fp32 is fast
    result["build_pair_s"] = round(time.perf_counter() - started, 1)
    say(f"{result['device']}: pair built in {result['build_pair_s']} s")
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

    def run(phase, who: tuple, compiled=False, **setting):
        flop = result[f"phase_{phase}"]["model_tflop_per_step"] * 1e12
        base = {"phase": phase, "batch": len(batches[phase]["input_ids"]), "attn": "sdpa", "checkpointing": False}
        base |= {"compile": compiled, "interleaved": len(who) > 1, **setting}
        try:
            if len(who) > 1:  # the pair at equal settings
                rows = gpu_measure({"ours": ours, "peer": peer}, batches[phase], flop, peak_flops, steps, warmup)
            else:
                with lever(ours, peer, who[0], phase, **setting) as model:
                    rows = gpu_measure({who[0]: model}, batches[phase], flop, peak_flops, steps, warmup)
            for model_name, measured in rows.items():
                result["rows"].append({"model": model_name, **base, **measured})
                say(json.dumps(result["rows"][-1]))
        except Exception as error:  # a lever that fails is reported, not fatal
            result["rows"].append({"model": "+".join(who), **base, "error": f"{type(error).__name__}: {error}"[:300]})
            say(json.dumps(result["rows"][-1]))

    def phase_setup(phase):
        result[f"phase_{phase}"]["trainable"] = set_phase(ours, peer, phase, lora)

    for phase in ("one", "two"):
        phase_setup(phase)
        run(phase, ("ours", "peer"))
        levers = [("ours", {"attn": PLAIN}), ("ours", {"checkpointing": True}), ("peer", {"checkpointing": True})]
        levers += [("ours", {"attn": "eager"}), ("peer", {"attn": "eager"})] if phase == "one" else []
        for who, setting in levers:
            run(phase, (who,), **setting)
        if cuda:
            result["profiles"][f"ours_{phase}"] = gpu_profile(ours, batches[phase])
    unset_lora(ours, peer)
    # Compiled: both models' decoder layers, LoRA inside in phase two (the layers recompile once for it).
    torch._dynamo.reset()
    compile_pair(ours, peer, backend)
    for phase in ("one", "two"):
        if cuda and left() < 150:
            result["skipped"].append(f"phase {phase} compiled: {left():.0f} s left")
            continue
        phase_setup(phase)
        run(phase, ("ours", "peer"), compiled=True)
    unset_lora(ours, peer)
    dtype = "bfloat16" if cuda else "float32"
    return write_training_config(workdir, ours.config, dtype, batch_size=8, logging_steps=10)


def gpu_table(result: dict) -> str:
    """The rows as a text table (also written beside the JSON)."""
    lines = [
        f"{result['device']}  torch {result['torch']}  transformers {result['transformers']}  peft {result['peft']}",
        "model phase batch attn          ckpt  compile inter  step_s  samples/s  tokens/s  TFLOP/s  MFU    peak_GB",
    ]
    for r in result["rows"]:
        head = (
            f"{r['model']:5} {r['phase']:5} {r['batch']:5} {r['attn']:13} {r['checkpointing']!s:5} "
            f"{r['compile']!s:7} {r['interleaved']!s:5}"
        )
        mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
        lines.append(
            f"{head} {r['error']}"
            if "error" in r
            else f"{head} {r['step_s']:7.4f} {r['samples_s']:9.2f} "
            f"{r['tokens_s']:9d} {r['tflop_s']:8.1f}  {mfu:6} {r.get('peak_gb', '-')}"
        )
    pairs = {}
    for r in result["rows"]:
        if r.get("interleaved") and "error" not in r:
            pairs.setdefault((r["phase"], r["compile"]), {})[r["model"]] = r["samples_s"]
    eager_peer = {phase: v["peer"] for (phase, compiled), v in pairs.items() if not compiled}
    for (phase, compiled), v in pairs.items():
        line = f"phase {phase} {'compiled' if compiled else 'eager'}: ours / peer {v['ours'] / v['peer']:.3f}"
        lines.append(line + (f", ours / eager peer {v['ours'] / eager_peer[phase]:.3f}" if compiled else ""))
    for r in result.get("train_py", []):
        lines.append(
            f"train.py torch_compile={r['torch_compile']} use_liger_kernel={r['use_liger_kernel']}: " + json.dumps(r)
        )
    for key in ("compiled_over_eager", "liger_over_unfused_eager", "liger_over_unfused_compiled"):
        if f"train_py_{key}" in result:
            lines.append(f"train.py samples/s, {key.replace('_', ' ')}: {result[f'train_py_{key}']}")
    for key, prof in result["profiles"].items():
        lines.append(f"profile {key}: " + json.dumps({k: v for k, v in prof.items() if k != "top"}))
        lines += [f"  {ms:8.2f} ms {count:5d}x  {kernel}" for kernel, ms, count in prof["top"]]
    lines += [f"skipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)
