"""The small-GPU recipe at real size: peak memory, the dry run's estimate and samples/s, against the bf16 recipe.

    python bench_lowmem.py [--out DIR] [--steps 8]     Phi-3-mini + CLIP-L/14, random weights, on a GPU (~5 min)
    python bench_lowmem.py --tiny [--out DIR]          the same path at a tiny size (runs on a CPU; for tests)

Each recipe's two phases (8 GB: phi_clip_8gb.yaml then phi_clip_p2_8gb.yaml; bf16: phi_clip.yaml then
phi_clip_p2.yaml), from the configs as train.py reads them: the model built as its build_model builds it (phase two
from the phase-one directory just written, with the config's model.quantize), then training steps as its Trainer
takes them: the config's dtype autocast, gradient checkpointing, batch size, optimiser (TrainingArguments' mapping:
torch AdamW, or bitsandbytes' AdamW with 8-bit states, paged or not) and gradient clipping; one optimizer step per
batch. The backbones are random weights written once to a temporary directory and named by path, as a hub id
would be; every sample is exactly model.max_length tokens with ANSWER_TOKENS supervised, the dry run's
assumptions, so its estimate and the measurement describe the same step. Per phase: torch.cuda.max_memory_allocated
(the ≤ 8 GB criterion), the reserved peak plus memory outside PyTorch (the CUDA context: what a card must hold), the
dry run's estimate of both, samples/s (median step, after warm-up steps) and the size of the checkpoint written.
Writes lowmem.json and lowmem.md (a table) to --out after every phase.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def command_line() -> argparse.ArgumentParser:
    """bench_lowmem.py's arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny backbones (any device; what the tests run)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per phase (after 2 warm-up)")
    parser.add_argument("--out", type=Path, help="directory for lowmem.json and lowmem.md")
    return parser


if __name__ == "__main__":
    command_line().parse_args(sys.argv[1:])  # --help and bad arguments answer here, before torch loads

import gc  # the heavy imports follow the early argument check above
import json
import statistics
import tempfile
import time

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from bench_pair import REAL_TEXT, REAL_VISION, TINY_TEXT, TINY_VISION
from config import IMAGE_TOKEN, torch_dtype
from dry_run import ANSWER_TOKENS, build_meta_model, memory_breakdown
from model import PhiClipMLLM, quiet_loading
from processor import build_word_tokenizer, image_processor_class
from train import build_model
from training_config import load_config

ROOT = Path(__file__).resolve().parent
# The 8 GB recipe first: its figures are the point, and a run cut short should still have them.
RECIPES = {"8gb": ("phi_clip_8gb.yaml", "phi_clip_p2_8gb.yaml"), "bf16": ("phi_clip.yaml", "phi_clip_p2.yaml")}
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "large",
    "small",
    "red",
    "blue",
    "green",
    "dog",
    "cat",
    "man",
    "woman",
    "street",
    "table",
    "sky",
    "tree",
    "car",
    "bus",
]
GB = 1e9


def write_backbones(workdir: Path, tiny: bool) -> dict[str, str]:
    """Random-weight backbones and a stand-in tokenizer saved under workdir; the --set overrides that name them."""
    text, vision = (TINY_TEXT, TINY_VISION) if tiny else (REAL_TEXT, REAL_VISION)
    tokenizer = build_word_tokenizer([" ".join(WORDS)] * 8, vocab_size=400)
    tokenizer.save_pretrained(workdir / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds even at 3.8 B parameters
        end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        text_config = AutoConfig.for_model(**text, pad_token_id=tokenizer.pad_token_id, eos_token_id=end)
        lm = AutoModelForCausalLM.from_config(text_config, dtype=torch.bfloat16)
        tower = CLIPVisionModel._from_config(
            CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"}), dtype=torch.bfloat16
        )
    with quiet_loading():
        lm.save_pretrained(workdir / "text")
        tower.save_pretrained(workdir / "vision")
    size = vision["image_size"]
    processor = image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(workdir / "vision")
    del lm, tower
    release()
    names = {"text_model": workdir / "text", "vision_model": workdir / "vision", "tokenizer": workdir / "tokenizer"}
    return {f"model.{key}": str(path) for key, path in names.items()}


def release() -> None:
    """Free what the last phase left (its model sits in reference cycles) before the next one is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_samples(model: PhiClipMLLM, count: int) -> tuple[list[dict], int, int]:
    """`count` samples of one image and exactly model.max_length tokens (or as close below as the tokenizer
    allows), ANSWER_TOKENS of them supervised; returns the samples, their length and supervised tokens."""
    processor, max_length = model.processor, model.config.max_length
    answer_words = min(ANSWER_TOKENS - 1, (max_length - model.num_image_tokens) // 2)  # + the end token
    answer = " ".join(WORDS[i % len(WORDS)] for i in range(answer_words))
    size = model.vision_model.config.image_size
    image = Image.new("RGB", (size, size), (120, 80, 40))

    def sample(words: int) -> tuple[list[dict], dict | None]:
        instruction = " ".join(WORDS[(3 * i) % len(WORDS)] for i in range(words))
        conversation = [
            {"role": "user", "content": f"{instruction} {IMAGE_TOKEN}"},
            {"role": "assistant", "content": answer},
        ]
        try:
            batch = processor(conversations=[conversation], images=[[image]])
        except ValueError:  # the prompt alone is too long
            return conversation, None
        whole = batch["input_ids"].shape[1] <= max_length and (batch["labels"] != -100).sum() >= answer_words
        return conversation, batch if whole else None

    low, high = 0, max_length  # the longest instruction whose sample still fits whole
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if sample(middle)[1] is not None else (low, middle - 1)
    conversation, batch = sample(low)
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    return [{"conversation": conversation, "images": [image]}] * count, batch["input_ids"].shape[1], supervised


def make_optimizer(parameters: list[torch.Tensor], name: str, learning_rate: float) -> torch.optim.Optimizer:
    """training_args.optim as TrainingArguments maps it: torch's AdamW, or bitsandbytes' AdamW with 8-bit states."""
    if name == "adamw_torch":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    import bitsandbytes

    return bitsandbytes.optim.AdamW(
        parameters, lr=learning_rate, weight_decay=0.0, optim_bits=8, is_paged=name.startswith("paged")
    )


def measure(config: dict, phase: str, steps: int, warmup: int) -> dict:
    """Build the phase's model, take warmup + steps training steps, and report memory and speed."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    leftover = torch.cuda.memory_allocated() / GB if cuda else 0.0  # an earlier phase's tensors would count too
    started = time.perf_counter()
    model = build_model(config, phase).to(device).train()  # as train.py builds it for a fresh run
    built_s = time.perf_counter() - started
    args, dtype = config["training_args"], torch_dtype(config["dtype"])
    batch_size = args["batch_size"]
    samples, length, supervised = make_samples(model, batch_size)
    batch = model.processor(conversations=[s["conversation"] for s in samples], images=[s["images"] for s in samples])
    batch = {k: v.to(device) for k, v in batch.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, args["optim"], args["learning_rate"])

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(round(step(), 4))  # .item() waits for the step
        times.append(time.perf_counter() - start)
    row = {
        "phase": phase,
        "config": Path(config["path"]).name,
        "batch": batch_size,
        "tokens_per_sample": length,
        "supervised_per_sample": supervised,
        "checkpointing": args["gradient_checkpointing"],
        "quantize": model.config.quantize,
        "optim": args["optim"],
        "trainable": model.parameter_counts()["trainable"],
        "build_s": round(built_s, 1),
        "allocated_before_build_gb": round(leftover, 3),
        "step_s": round(statistics.median(times[warmup:]), 4),
        "losses": losses,
    }
    row["samples_s"] = round(batch_size / row["step_s"], 2)
    if cuda:
        free, total = torch.cuda.mem_get_info()
        outside = (total - free) - torch.cuda.memory_reserved()  # the CUDA context, cuBLAS workspaces
        row.update(
            peak_allocated_gb=round(torch.cuda.max_memory_allocated() / GB, 3),
            peak_reserved_gb=round(torch.cuda.max_memory_reserved() / GB, 3),
            outside_pytorch_gb=round(outside / GB, 3),
        )
        row["card_needs_gb"] = round(row["peak_reserved_gb"] + row["outside_pytorch_gb"], 3)
    meta, _ = build_meta_model(config, phase)
    estimate = memory_breakdown(
        meta, batch_size, meta.config.max_length, args["gradient_checkpointing"], model.config.quantize, args["optim"]
    )
    row["estimate_gb"] = {k: round(v, 3) for k, v in estimate.items()}
    if cuda:
        row["estimate_over_allocated"] = round(estimate["allocated"] / row["peak_allocated_gb"], 3)
        row["estimate_over_card_need"] = round(estimate["total"] / row["card_needs_gb"], 3)
    saved = model.save_pretrained(Path(config["checkpoint"]["output_dir"]))
    row["checkpoint_mb"] = round(sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 1e6, 2)
    return row  # the model, its optimiser and batch go with this frame: run() then releases their memory


def run(tiny: bool = False, steps: int = 8, warmup: int = 2, out: Path | None = None, say=print) -> dict:
    """Both recipes, both phases; the result dict that lowmem.json holds."""
    import peft
    import transformers

    try:
        import bitsandbytes

        bnb_version = bitsandbytes.__version__
    except ImportError:
        bnb_version = None
    cuda = torch.cuda.is_available()
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "size": "tiny" if tiny else "real (Phi-3-mini-4k + CLIP-L/14, random weights)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb_version,
        "steps": steps,
        "warmup_steps": warmup,
        "rows": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        names = write_backbones(workdir, tiny)
        say(f"backbones written in {time.perf_counter() - started:.0f} s")
        common = [f"{key}={value}" for key, value in names.items()] + ["data.num_workers=0"]
        common += ["model.max_length=64"] if tiny else []
        for recipe, (one, two) in RECIPES.items():
            p1, p2 = workdir / f"{recipe}_p1", workdir / f"{recipe}_p2"
            for phase, name in (("one", one), ("two", two)):
                overrides = [*common, f"checkpoint.output_dir={p1 if phase == 'one' else p2}"]
                overrides += [f"checkpoint.load_dir={p1}"] if phase == "two" else []
                config = load_config(ROOT / "training_configs" / name, overrides, phase=phase, check_paths=False)
                try:
                    row = {"recipe": recipe, **measure(config, phase, steps, warmup)}
                except Exception as error:  # a failing phase is reported, the others still run
                    row = {
                        "recipe": recipe,
                        "phase": phase,
                        "config": name,
                        "error": f"{type(error).__name__}: {error}",
                    }
                release()
                result["rows"].append(row)
                result["seconds"] = round(time.perf_counter() - started, 1)
                result["summary"] = summary(result["rows"])
                say(json.dumps(row))
                if out is not None:  # after every phase: a run cut short still leaves what it measured
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "lowmem.json").write_text(json.dumps(result, indent=2) + "\n")
                    (out / "lowmem.md").write_text(table(result) + "\n")
    return result


def summary(rows: list[dict]) -> dict:
    """Issue 13's criteria per phase of the 8 GB recipe: peak allocated <= 8 GB, the estimate's ratio to the
    measurement (0-15% above is the target), and samples/s relative to the bf16 recipe's same phase."""
    measured = {(r["recipe"], r["phase"]): r for r in rows if "error" not in r}
    result = {}
    for phase in ("one", "two"):
        small, bf16 = measured.get(("8gb", phase)), measured.get(("bf16", phase))
        if small is None:
            continue
        entry = {"samples_s": small["samples_s"]}
        if bf16 is not None:
            entry["speed_vs_bf16"] = round(small["samples_s"] / bf16["samples_s"], 3)
        if "peak_allocated_gb" in small:
            entry["peak_allocated_gb"] = small["peak_allocated_gb"]
            entry["fits_8gb"] = small["peak_allocated_gb"] <= 8.0
            entry["estimate_over_allocated"] = small["estimate_over_allocated"]
            entry["estimate_over_card_need"] = small["estimate_over_card_need"]
        result[f"phase_{phase}"] = entry
    return result


def table(result: dict) -> str:
    """README's "Smaller GPUs" layout, measured: config -> peak (allocated / card need) -> estimate -> samples/s."""
    lines = [
        f"{result['device']}, {result['size']}; torch {result['torch']}, transformers {result['transformers']}, "
        f"peft {result['peft']}, bitsandbytes {result['bitsandbytes']}; {result['seconds']} s",
        "",
        "| recipe | phase | config | batch | quantize | optim | ckpt | peak allocated GB | card needs GB "
        "| estimate GB (allocated / total) | samples/s | checkpoint MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines[1:1] = [f"8 GB recipe, {k.replace('_', ' ')}: {json.dumps(v)}" for k, v in result.get("summary", {}).items()]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['phase']} | {r['config']} | error: {r['error'][:150]} |")
            continue
        estimate = f"{r['estimate_gb']['allocated']:.2f} / {r['estimate_gb']['total']:.2f}"
        lines.append(
            f"| {r['recipe']} | {r['phase']} | {r['config']} | {r['batch']} | {r['quantize']} | {r['optim']} "
            f"| {r['checkpointing']} | {r.get('peak_allocated_gb', '-')} | {r.get('card_needs_gb', '-')} "
            f"| {estimate} | {r['samples_s']} | {r['checkpoint_mb']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print the table; exit status 1 when a phase failed."""
    args = command_line().parse_args(argv)
    result = run(args.tiny, args.steps, out=args.out)
    print(table(result))
    return 1 if any("error" in row for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
