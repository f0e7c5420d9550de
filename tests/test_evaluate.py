"""evaluate.py scoring and the generate.py command line."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_image

import generate as generate_cli
from dataset import make_dataset
from evaluate import caption_scores, evaluate, normalize_caption
from model import PhiClipMLLM
from shapes import make_demo


def test_normalize_caption():
    assert normalize_caption("  A Man, riding a HORSE. ") == "a man riding a horse"


def test_caption_scores_perfect_partial_and_wrong():
    refs = {1: ["A man riding a horse on the beach.", "a person on a horse"], 2: ["two dogs play in the snow"]}
    perfect = caption_scores({1: "a man riding a horse on the beach", 2: "Two dogs play in the snow."}, refs)
    assert perfect["exact_match"] == 1.0 and perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    half = caption_scores({1: "a person on a horse", 2: "a cat sleeps on a sofa"}, refs)
    assert half["exact_match"] == 0.5 and half["bleu4"] < perfect["bleu4"] and half["cider"] < perfect["cider"]


def test_evaluate_on_demo_split(make_model, tmp_path):
    make_demo(tmp_path / "demo", n=320, seed=1)
    dataset = make_dataset(
        {
            "format": "coco",
            "annotation_file": str(tmp_path / "demo" / "captions_val.json"),
            "image_directory": str(tmp_path / "demo" / "images"),
        }
    )
    model = make_model()
    metrics, results = evaluate(model, dataset, limit=8, batch_size=4, max_new_tokens=4)
    assert metrics["images"] == 8 and len(results) == 8
    assert {"image_id", "caption"} <= set(results[0])
    assert math.isclose(metrics["perplexity"], math.exp(metrics["val_loss"]), rel_tol=1e-6)
    assert 0.0 <= metrics["exact_match"] <= 1.0


def test_generate_cli_prints_the_caption(make_model, tmp_path, capsys):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    random_image(3).save(tmp_path / "photo.png")
    generate_cli.main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt"),
            "--image",
            str(tmp_path / "photo.png"),
            "--max_new_tokens",
            "5",
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out.strip()
    reloaded = PhiClipMLLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        expected = generate_cli.generate(reloaded, generate_cli.DEFAULT_PROMPT, [tmp_path / "photo.png"], 5)[0]
    assert printed == expected
