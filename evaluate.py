"""Evaluate a checkpoint: validation loss and perplexity, and greedy captions scored against every reference.

    python evaluate.py --checkpoint DIR --config CFG [--split val] [--limit N] [--batch_size B] [--output FILE]
        [--caption_tokenizer auto|ptb|simple]

Prints one JSON object: val_loss and perplexity; for captioned images exact_match, bleu1..bleu4, meteor, rouge_l
and cider (CIDEr-D), as the COCO caption evaluation computes them (caption_tokenizer names the tokenisation they
scored; METEOR runs with the PTB one only); for conversations (LLaVA format) answer_accuracy, the exact match of each
answered turn given the turns before it; and how many captions and answers were cut at max_new_tokens
(captions_at_max_new_tokens, answers_at_max_new_tokens). Writes the generated captions in COCO results format
(``[{"image_id": ..., "caption": ...}]``), the answers and the metrics: into the checkpoint (captions_SPLIT.json,
answers_SPLIT.json, metrics_SPLIT.json), or all beside --output FILE (FILE, FILE's name + _answers.json,
+ _metrics.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caption_metrics import CAPTION_TOKENIZERS, PTBUnavailable, caption_scores, normalize_caption
from config import CommandLine, ConfigError, checkpoint_directory, checkpoint_problem, fail, last_line
from training_config import load_config


def command_line() -> argparse.ArgumentParser:
    """evaluate.py's arguments."""
    parser = CommandLine(description="Evaluate a PhiClipMLLM checkpoint on a split of a training config.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (train.py's output)")
    parser.add_argument("--config", required=True, help="the training YAML whose data section names the split")
    parser.add_argument("--split", default="val", choices=["val", "train"])
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate the first N captioned images and N conversations only"
    )
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument(
        "--output",
        default=None,
        metavar="FILE",
        help="the captions' COCO results JSON; the answers and metrics go beside it, named after it "
        "(--output out/p2.json: out/p2.json, out/p2_answers.json, out/p2_metrics.json). Default: "
        "CHECKPOINT/captions_SPLIT.json, answers_SPLIT.json and metrics_SPLIT.json",
    )
    parser.add_argument(
        "--caption_tokenizer",
        default="auto",
        choices=CAPTION_TOKENIZERS,
        help="BLEU/METEOR/ROUGE-L/CIDEr-D tokenisation: ptb, the COCO caption evaluation's (java); simple, normalize_caption; "
        "auto (default): ptb when java runs, else simple. The metrics name the one used; METEOR needs ptb",
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available)")
    return parser


def read_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """Parse and check the arguments and the config (one `error:` line on bad input); returns (args, config)."""
    args = command_line().parse_args(argv)
    if problem := checkpoint_problem(args.checkpoint):
        fail(f"--checkpoint {args.checkpoint}: {problem}")
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            fail(f"--{name} must be positive, got {value}")
    if args.output is not None:  # checked now, not after the whole evaluation has run
        output = Path(args.output).expanduser()
        if output.is_dir():
            fail(f"--output {args.output}: is a directory; give a file name, e.g. {output / 'results.json'}")
        if not output.parent.is_dir():
            fail(f"--output {args.output}: no such directory {str(output.parent)!r}; create it first")
    try:
        config = load_config(args.config, splits=(args.split,))  # only the evaluated split's files must exist
    except ConfigError as error:
        fail(str(error))
    if not config["data"].get(args.split):
        fail(f"{args.config}: data.{args.split} is not set, so there is no {args.split} split to evaluate")
    return args, config


if __name__ == "__main__":
    read_arguments()  # answers --help and bad input before the imports below (~6 s)

import json  # the heavy imports follow the early argument check above
import logging
import math
import os
from collections import defaultdict
from typing import Any

import torch
from tqdm import tqdm

from dataset import SKIPPED, Collator, ConversationDataset, make_dataloader, make_dataset
from generate import choose_device, load_checkpoint_or_exit
from model import PhiClipMLLM, generate_ids, loss_per_sample
from processor import IMAGE_TOKEN, BadImageError, TooLong
from sources import BadRecordError

logger = logging.getLogger("evaluate")


@torch.no_grad()
def validation_loss(
    model: PhiClipMLLM,
    dataset: ConversationDataset,
    batch_size: int = 16,
    num_workers: int = 0,
) -> dict[str, float]:
    """Mean loss per supervised token over the split (token-weighted, not batch-averaged), and its perplexity."""
    loader = make_dataloader(
        dataset, Collator(model.processor), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    device = next(model.parameters()).device
    model.eval()
    total, tokens = 0.0, 0
    for batch in tqdm(loader, desc="val loss", leave=False, disable=None):
        batch = {k: v.to(device) for k, v in batch.items() if k not in SKIPPED}
        sums, counts = loss_per_sample(model(**batch).logits, batch["labels"])
        total, tokens = total + float(sums.double().sum()), tokens + int(counts.sum())
    loss = total / max(tokens, 1)
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "val_tokens": tokens}


def caption_split(dataset: ConversationDataset, limit: int | None = None) -> tuple[list, dict, dict]:
    """One (key, prompt, image) per distinct captioned image (the first `limit`), and every reference per key.

    A key is (source file, image id): two files of a split may use the same ids for different images (COCO and a
    COCO-format Flickr30k both start at 1), whose captions must not become one image's references.
    """
    references: dict[Any, list[str]] = defaultdict(list)
    queries: dict[Any, tuple[str, list]] = {}
    for index, record in enumerate(dataset.records):
        if record.conversation:
            continue
        key = (dataset.source_of(index), record.id)
        references[key].extend(record.captions)
        if key not in queries:
            sample = dataset.sample(index, epoch=0)
            queries[key] = (sample["conversation"][0]["content"], sample["images"])
    keys = list(queries)[:limit]
    return keys, {k: queries[k] for k in keys}, {k: references[k] for k in keys}


def answered_turns(dataset: ConversationDataset, limit: int | None = None) -> list[dict]:
    """Every answer of the first `limit` conversations, with the conversation before it (earlier answers as given)."""
    turns = []
    conversations = [index for index, record in enumerate(dataset.records) if record.conversation][:limit]
    for index in conversations:
        sample = dataset.sample(index, epoch=0)
        history = sample["conversation"]
        for position, turn in enumerate(history):
            if turn["role"] == "assistant":
                shown = sum(earlier["content"].count(IMAGE_TOKEN) for earlier in history[:position])
                context = {"history": history[:position], "images": sample["images"][:shown]}
                context["reference"] = turn["content"]
                turns.append({"id": sample["id"], "turn": position, **context})
    return turns


def generate_or_skip(
    model: PhiClipMLLM, prompts: list, images: list, max_new_tokens: int, on_bad_image: str
) -> list[tuple[str, bool] | None]:
    """Greedy replies for a batch as (text, cut) pairs, cut when the reply reached max_new_tokens before a stop
    token; with on_bad_image "skip" a prompt whose image cannot be read gets None (and a warning naming the file),
    as a training batch replaces it; with "error" the BadImageError stands."""

    def replies(prompts: list, images: list) -> list[tuple[str, bool]]:
        ids = generate_ids(model, prompts, images, max_new_tokens)
        stopped = torch.isin(ids, torch.tensor(model.processor.stop_token_ids, device=ids.device)).any(dim=1)
        texts = model.tokenizer.batch_decode(ids, skip_special_tokens=True)  # as generate() decodes
        return [(text.strip(), not stop) for text, stop in zip(texts, stopped.tolist())]

    try:
        return replies(prompts, images)
    except BadImageError:
        if on_bad_image == "error":
            raise
    found = []
    for prompt, image in zip(prompts, images):  # one by one, to find the bad ones
        try:
            found += replies([prompt], [image])
        except BadImageError as error:
            logger.warning("skipping bad image: %s", error)
            found.append(None)
    return found


def count_cut(kind: str, cut: int, replies: int, max_new_tokens: int) -> dict[str, int]:
    """The metric `<kind>_at_max_new_tokens`, and a warning when any reply was cut there."""
    if cut:
        logger.warning(
            "%d of %d %s reached max_new_tokens (%d) before a stop token and were cut there: raise --max_new_tokens, "
            "or the model has not learned to end its replies",
            cut,
            replies,
            kind,
            max_new_tokens,
        )
    return {f"{kind}_at_max_new_tokens": cut}


def answer_accuracy(
    model: PhiClipMLLM, turns: list[dict], batch_size: int = 16, max_new_tokens: int = 32, on_bad_image: str = "skip"
) -> tuple[dict, list[dict]]:
    """Greedy answers scored by exact match (normalize_caption) per answered turn; returns (metrics, answers).

    A turn whose conversation so far outgrows max_length is not answered (training cut such a conversation there;
    a reply cannot start from a cut prompt): counted as `answer_turns_too_long`.
    """
    fitting = []
    for turn in turns:
        try:
            model.processor.check(turn["history"], len(turn["images"]), add_generation_prompt=True)
        except TooLong:
            continue
        fitting.append(turn)
    if len(fitting) < len(turns):
        logger.warning(
            "%d answer turn(s) not answered: the conversation before them is longer than max_length",
            len(turns) - len(fitting),
        )
    too_long, turns, answers, bad, cut = len(turns) - len(fitting), fitting, [], 0, 0
    for start in tqdm(range(0, len(turns), batch_size), desc="answers", leave=False, disable=None):
        chunk = turns[start : start + batch_size]
        prompts, images = [t["history"] for t in chunk], [t["images"] for t in chunk]
        replies = generate_or_skip(model, prompts, images, max_new_tokens, on_bad_image)
        for turn, reply in zip(chunk, replies):
            if reply is None:
                bad += 1
                continue
            reply, reply_cut = reply
            cut += reply_cut
            answers.append(
                {
                    "id": turn["id"],
                    "turn": turn["turn"],
                    "question": turn["history"][-1]["content"],
                    "answer": reply,
                    "reference": turn["reference"],
                    "correct": normalize_caption(reply) == normalize_caption(turn["reference"]),
                }
            )
    correct = sum(answer["correct"] for answer in answers)
    metrics = {"answer_accuracy": correct / max(len(answers), 1), "answered_turns": len(answers)}
    metrics |= count_cut("answers", cut, len(answers), max_new_tokens)
    metrics |= {"answer_turns_too_long": too_long} if too_long else {}
    return metrics | ({"answer_turns_bad_image": bad} if bad else {}), answers


def evaluate(
    model: PhiClipMLLM,
    dataset: ConversationDataset,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    num_workers: int = 0,
    caption_tokenizer: str = "auto",
) -> tuple[dict, dict[str, list[dict]]]:
    """Loss and perplexity over the split; greedy-caption scores over its captioned images and answer accuracy
    over its conversations (the first `limit` of each). Returns (metrics, {"captions": COCO-format results,
    "answers": each answered turn's reply and reference})."""
    ids, queries, references = caption_split(dataset, limit)
    # The loss covers the same images: every record of each (one per caption under captions_per_image: all)
    chosen = set(ids)
    captioned = [
        i
        for i, record in enumerate(dataset.records)
        if not record.conversation and (dataset.source_of(i), record.id) in chosen
    ]
    talks = [i for i, record in enumerate(dataset.records) if record.conversation]
    metrics = validation_loss(model, dataset.subset(captioned + talks[:limit]), batch_size, num_workers)
    results: dict[str, list[dict]] = {"captions": [], "answers": []}
    if ids:
        predictions, cut = {}, 0
        for start in tqdm(range(0, len(ids), batch_size), desc="captions", leave=False, disable=None):
            chunk = ids[start : start + batch_size]
            prompts, images = [queries[k][0] for k in chunk], [queries[k][1] for k in chunk]
            replies = generate_or_skip(model, prompts, images, max_new_tokens, dataset.on_bad_image)
            predictions.update((k, reply[0]) for k, reply in zip(chunk, replies) if reply is not None)
            cut += sum(reply[1] for reply in replies if reply is not None)
        if predictions:  # none when every image is bad
            metrics.update(caption_scores(predictions, {k: references[k] for k in predictions}, caption_tokenizer))
        metrics["images"] = len(predictions)
        metrics |= count_cut("captions", cut, len(predictions), max_new_tokens)
        if len(predictions) < len(ids):
            metrics["bad_images"] = len(ids) - len(predictions)
        # COCO results format; with several caption files the file too, as their image ids may repeat
        several = len({file for file, _ in ids}) > 1
        results["captions"] = [
            {"image_id": k[1], "caption": predictions[k]} | ({"annotation_file": k[0]} if several else {})
            for k in ids
            if k in predictions
        ]
    if talks:
        turns = answered_turns(dataset, limit)
        scores, results["answers"] = answer_accuracy(model, turns, batch_size, max_new_tokens, dataset.on_bad_image)
        metrics.update(scores)
    return metrics, results


def result_files(checkpoint: Path, split: str, output: str | None) -> dict[str, Path]:
    """Where the captions, answers and metrics go: into the checkpoint, or all beside `output`, named after it."""
    if output is None:
        return {kind: checkpoint / f"{kind}_{split}.json" for kind in ("captions", "answers", "metrics")}
    output = Path(output).expanduser()
    return {
        "captions": output,
        "answers": output.with_name(f"{output.stem}_answers.json"),
        "metrics": output.with_name(f"{output.stem}_metrics.json"),
    }


def run_settings(args: argparse.Namespace, config: dict, model: PhiClipMLLM) -> dict[str, Any]:
    """What produced the figures, for metrics_*.json: the checkpoint, the data and how it was read, the decoding,
    where and with which versions it ran."""
    from datetime import datetime, timezone
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    parameter = next(model.parameters())
    return {
        "checkpoint": str(checkpoint_directory(args.checkpoint).resolve()),
        "config": str(Path(args.config).resolve()),
        "split": args.split,
        "data": config["data"][args.split],  # files, max_samples, captions_per_image
        "seed": config["seed"],  # draws each caption sample's instruction (and, per image, its val_loss caption)
        "limit": args.limit,
        "decoding": "greedy",
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "device": str(parameter.device),
        "dtype": str(parameter.dtype).removeprefix("torch."),
        "versions": {p: installed(p) for p in ("torch", "transformers", "peft", "pycocoevalcap")},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: print the metrics as JSON and write the generated captions."""
    args, config = read_arguments(argv)
    device = choose_device(args.device)
    try:
        dataset = make_dataset(config["data"][args.split], seed=config["seed"])
    except (ValueError, FileNotFoundError) as error:
        fail(f"{args.config}: data.{args.split}: {error}")
    model = load_checkpoint_or_exit(args.checkpoint, device)
    dataset.attach(model.processor)  # a sample too long for max_length is skipped and counted, as in training
    try:
        metrics, results = evaluate(
            model,
            dataset,
            args.limit,
            args.batch_size,
            args.max_new_tokens,
            config["data"]["num_workers"],
            args.caption_tokenizer,
        )
    except (BadImageError, BadRecordError) as error:  # on_bad_*: error
        fail(f"{args.config}: data.{args.split}: {last_line(error)}")
    except PTBUnavailable as error:  # --caption_tokenizer ptb without a working java
        fail(f"--caption_tokenizer ptb: {error}")
    metrics["settings"] = run_settings(args, config, model)  # a dict: the model card quotes only the numbers
    files = result_files(checkpoint_directory(args.checkpoint), args.split, args.output)

    def write(path: Path, values: Any, indent: int) -> None:  # whole or absent: a killed run leaves no half file
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(values, indent=indent) + "\n")
        staged[partial] = path

    staged: dict[Path, Path] = {}
    if results["captions"]:
        write(files["captions"], results["captions"], 1)
        metrics["results_file"] = str(files["captions"])
    if results["answers"]:
        write(files["answers"], results["answers"], 1)
        metrics["answers_file"] = str(files["answers"])
    write(files["metrics"], metrics, 2)  # in the checkpoint by default, where export.py's model card quotes it
    # The earlier metrics go first and the new ones come last: a kill in between leaves new captions without
    # figures, never beside an earlier evaluation's.
    files["metrics"].unlink(missing_ok=True)
    for partial, path in staged.items():
        os.replace(partial, path)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
