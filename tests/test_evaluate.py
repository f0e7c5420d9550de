"""evaluate.py scoring and the generate.py command line."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
from collections import Counter

import pytest
import torch
import yaml
from conftest import SHARED_DATA, random_image, require_shared

import generate as generate_cli
from caption_metrics import PTBUnavailable, _meteor_scorer, meteor_score, ptb_tokenize
from dataset import SKIPPED, Collator, make_dataset
from evaluate import caption_scores, caption_split, evaluate, normalize_caption, validation_loss
from model import IMAGE_TOKEN, PhiClipMLLM, generate
from shapes import make_demo


def test_normalize_caption():
    assert normalize_caption("  A Man, riding a HORSE. ") == "a man riding a horse"
    # a model's curly apostrophe or ellipsis, a full-width letter, a decomposed accent: the same answer
    assert normalize_caption("It\u2019s \u201cred\u201d\u2026") == normalize_caption('it\'s "red"...') == "it s red"
    assert normalize_caption("\uff32ed caf\u0065\u0301 \u2014 STRASSE") == normalize_caption(
        "red caf\u00e9 Stra\u00dfe"
    )


WORDS = ("sitting", "playing", "frolic")  # instead of "play": another word, its stem, a paraphrase in METEOR's table


def test_caption_scores_perfect_partial_and_wrong():
    refs = {1: ["A man riding a horse on the beach.", "a person on a horse"], 2: ["two dogs play in the snow"]}
    perfect = caption_scores({1: "a man riding a horse on the beach", 2: "Two dogs play in the snow."}, refs)
    assert perfect["exact_match"] == 1.0 and perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    half = caption_scores({1: "a person on a horse", 2: "a cat sleeps on a sofa"}, refs)
    assert half["exact_match"] == 0.5 and half["bleu4"] < perfect["bleu4"] and half["cider"] < perfect["cider"]
    assert half["rouge_l"] == pytest.approx(0.5)  # image 1 whole, image 2 no common word at all
    shuffled = caption_scores({1: "horse a on person a", 2: "snow the in play dogs two"}, refs)
    assert shuffled["exact_match"] == 0 and shuffled["bleu4"] < 0.01  # every word right, no 4-gram: BLEU-4, not -1
    assert shuffled["rouge_l"] < half["rouge_l"]  # the longest common subsequence, not the bag of words
    if shutil.which("java") is not None:  # METEOR: word order counts, and so do stems and paraphrases
        assert perfect["meteor"] == pytest.approx(1.0) and shuffled["meteor"] < 0.7 * perfect["meteor"]
        dogs = {w: caption_scores({1: "a person on a horse", 2: f"two dogs {w} in the snow"}, refs) for w in WORDS}
        assert len({(dogs[w]["bleu1"], dogs[w]["rouge_l"]) for w in WORDS}) == 1  # one word wrong, for these two
        assert dogs["sitting"]["meteor"] < 0.6 < dogs["playing"]["meteor"] < 1 and dogs["frolic"]["meteor"] > 0.6
    edge = caption_scores({1: "", 2: "?!", 3: "a dog"}, {1: ["a cat"], 2: ["a dog"], 3: ["a dog", "."]}, "simple")
    assert edge["exact_match"] == pytest.approx(1 / 3) and 0 < edge["cider"] < perfect["cider"]
    assert caption_scores({1: "a dog"}, {1: ["..."]}, "simple")["cider"] == 0.0  # no reference token at all
    with pytest.raises(ValueError, match="collide"):
        caption_scores({7: "a dog", "7": "a cat"}, {7: ["a dog"], "7": ["a cat"]}, "simple")


def test_ptb_tokenize_is_the_coco_evaluation_s_and_keeps_one_line_per_caption():
    if shutil.which("java") is None:
        pytest.skip("no java: the PTB tokenizer cannot run")
    captions = [
        "A man's T-shirt (red).",
        "Don't stop!",
        "",
        "...",
        "caf\u00e9 \u201cx\u201d",
        "a dog\rruns",
        "x\u2028y",
    ]
    # What pycocoevalcap's PTBTokenizer wrapper gives for the first five; it shifted every caption after a \r or
    # U+2028 onto the next image's line
    assert ptb_tokenize(captions) == [
        "a man 's t-shirt -lrb- red -rrb-",
        "do n't stop",
        "",
        "",
        "caf\u00e9 x",
        "a dog runs",
        "x y",
    ]


def test_caption_scores_name_their_tokenizer_and_fall_back_without_java(tmp_path, monkeypatch, caplog):
    predictions, references = {1: "a red t-shirt"}, {1: ["A red T-shirt.", "a shirt"]}
    simple = caption_scores(predictions, references, "simple")
    assert simple["caption_tokenizer"] == "simple" and simple["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert simple["bleu1"] >= simple["bleu2"] >= simple["bleu3"] >= simple["bleu4"]
    if shutil.which("java") is not None:
        ptb = caption_scores(predictions, references, "ptb")  # "a red t-shirt": three tokens, no 4-gram
        assert ptb["caption_tokenizer"] == "ptb" and ptb["bleu4"] < 0.1 and ptb["bleu3"] == pytest.approx(1.0)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java
    assert caption_scores(predictions, references, "auto") == simple
    assert "tokenised by normalize_caption, not PTB; no METEOR (cannot run java" in caplog.text
    assert simple["meteor"] is None and simple["rouge_l"] == pytest.approx(1.0)
    with pytest.raises(PTBUnavailable, match="cannot run java"):
        caption_scores(predictions, references, "ptb")


def test_meteor_is_none_with_the_reason_when_its_java_fails(tmp_path, monkeypatch, caplog):
    java = tmp_path / "java"  # a JVM that cannot start, as on a machine short of memory for its 2 GB heap
    java.write_text("#!/bin/sh\necho 'Error: Could not reserve enough space for 2097152KB object heap' >&2\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    _meteor_scorer.cache_clear()  # a java process an earlier test started would still answer
    assert meteor_score({"1": ["a dog"]}, {"1": ["a dog"]}) is None
    assert "no METEOR: its java process failed (Error: Could not reserve enough space" in caplog.text
    java.unlink()
    assert meteor_score({"1": ["a dog"]}, {"1": ["a dog"]}) is None  # no java at all
    assert caplog.records[-1].getMessage() == "no METEOR: its java process failed (no java on PATH)"


def test_a_java_process_that_dies_mid_request_leaves_the_warning_only(tmp_path, monkeypatch, caplog):
    # A JVM gone with a request still buffered for it (killed for memory, say): collecting the scorer printed
    # "Exception ignored in: <function Meteor.__del__ ...>" and a BrokenPipeError traceback after the warning.
    java = tmp_path / "java"  # stops reading, says why, ends its output, and is killed by the caller
    java.write_text("#!/bin/sh\nexec 0<&-\necho 'Killed' >&2\nexec 1>&-\nexec sleep 60\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")  # this java, and the system's sleep
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    _meteor_scorer.cache_clear()
    assert meteor_score({"1": ["a dog"], "2": ["a cat"]}, {"1": ["a dog"], "2": ["a cat"]}) is None
    gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []
    assert caplog.records[-1].getMessage() == "no METEOR: its java process failed (Killed)"


def test_caption_split_keeps_every_reference_and_the_loss_is_per_token(make_model):
    dataset = make_dataset(
        {
            "format": "coco",
            "annotation_file": str(require_shared(SHARED_DATA / "coco" / "annotations" / "captions_val2017_mini.json")),
            "image_directory": str(SHARED_DATA / "coco" / "images" / "val2017"),
            "captions_per_image": "all",
        }
    )
    ids, _, references = caption_split(dataset)
    per_image = Counter(record.id for record in dataset.records)
    assert ids and all(len(references[k]) == per_image[k[1]] >= 5 for k in ids)
    model = make_model()
    dataset.attach(model.processor)
    few = dataset.subset(list(range(6)))
    by_two, by_six = validation_loss(model, few, batch_size=2), validation_loss(model, few, batch_size=6)
    assert by_two["val_loss"] == pytest.approx(by_six["val_loss"], rel=1e-5)  # a token mean, whatever the batching


def test_max_samples_under_captions_per_image_all_never_scores_an_image_on_part_of_its_references(tmp_path):
    """With one sample per caption, max_samples cut inside an image: its caption was judged against 2 of its 3
    references (exact match, BLEU, CIDEr-D). The cut falls before such an image, or after the first one whole."""
    for image in (1, 2):
        random_image(image).save(tmp_path / f"{image}.png")
    coco = {
        "images": [{"id": image, "file_name": f"{image}.png"} for image in (1, 2)],
        "annotations": [
            {"id": 10 * image + n, "image_id": image, "caption": f"image {image} caption {n}"}
            for image in (1, 2)
            for n in range(3)
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    source = {"format": "coco", "annotation_file": str(tmp_path / "captions.json"), "image_directory": str(tmp_path)}
    for max_samples, images in ((5, [1]), (6, [1, 2]), (2, [1]), (4, [1])):
        dataset = make_dataset({**source, "captions_per_image": "all", "max_samples": max_samples})
        _, _, references = caption_split(dataset)
        assert [key[1] for key in references] == images, max_samples
        assert all(len(captions) == 3 for captions in references.values()), max_samples
    assert len(make_dataset({**source, "max_samples": 1})) == 1  # one sample per image: cut as before


def test_the_same_image_id_in_two_caption_files_is_two_images(make_model, tmp_path):
    sources = []
    for name, caption in (("coco", "a red circle"), ("flickr", "a blue square")):
        (tmp_path / name).mkdir()
        random_image(len(sources)).save(tmp_path / name / "1.png")
        coco = {
            "images": [{"id": 1, "file_name": "1.png"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": caption}],
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(coco))
        sources.append(
            {
                "format": "coco",
                "annotation_file": str(tmp_path / f"{name}.json"),
                "image_directory": str(tmp_path / name),
            }
        )
    dataset = make_dataset(sources)
    ids, _, references = caption_split(dataset)
    assert sorted(references.values()) == [["a blue square"], ["a red circle"]]  # not one image with both
    metrics, results = evaluate(make_model(), dataset, batch_size=2, max_new_tokens=2)
    assert metrics["images"] == 2
    assert [(r["image_id"], r["annotation_file"]) for r in results["captions"]] == [
        (1, s["annotation_file"]) for s in sources
    ]


def test_limit_takes_the_loss_over_every_caption_of_the_first_images(make_model, tmp_path):
    (tmp_path / "images").mkdir()
    for image_id in (1, 2):
        random_image(image_id).save(tmp_path / "images" / f"{image_id}.png")
    captions = [(1, "a red circle"), (1, "a circle in red"), (1, "one red circle"), (2, "a blue square")]
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2)],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(captions)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    source = {"annotation_file": str(tmp_path / "captions.json"), "image_directory": str(tmp_path / "images")}
    dataset = make_dataset({"format": "coco", **source, "captions_per_image": "all"})  # a record per caption
    model = make_model()
    dataset.attach(model.processor)
    metrics, _ = evaluate(model, dataset, limit=1, batch_size=4, max_new_tokens=2)
    first_image = validation_loss(model, dataset.subset([0, 1, 2]), batch_size=4)  # its three captions
    assert metrics["images"] == 1 and metrics["val_tokens"] == first_image["val_tokens"]
    assert metrics["val_loss"] == pytest.approx(first_image["val_loss"], rel=1e-6)


def test_val_loss_is_the_cross_entropy_of_the_supervised_tokens_computed_by_hand(make_model, tmp_path):
    (tmp_path / "images").mkdir()
    captions = ["a red circle on the left", "two dogs", "a blue square on the right side of it", "a cat"]
    for image_id in range(len(captions)):
        random_image(image_id, size=40 + 8 * image_id).save(tmp_path / "images" / f"{image_id}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in range(len(captions))],
        "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in enumerate(captions)],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    source = {"annotation_file": str(tmp_path / "captions.json"), "image_directory": str(tmp_path / "images")}
    model = make_model()
    dataset = make_dataset({"format": "coco", **source}).attach(model.processor)
    total, tokens, collate = 0.0, 0, Collator(model.processor)
    with torch.no_grad():
        for index in range(len(dataset)):  # one sample at a time, no padding, every position's logits
            batch = {k: v for k, v in collate([dataset[index]]).items() if k not in SKIPPED}
            labels = batch.pop("labels")[0]
            log_probs = torch.log_softmax(model(**batch).logits[0].double(), dim=-1)
            supervised = [t for t in range(1, len(labels)) if labels[t] != -100]
            assert model.tokenizer.decode(labels[supervised]).startswith(captions[index])  # the caption, then <|end|>
            total -= sum(float(log_probs[t - 1, labels[t]]) for t in supervised)
            tokens += len(supervised)
    metrics = validation_loss(model, dataset, batch_size=3)  # padded batches of 3 and 1
    assert metrics["val_tokens"] == tokens
    assert metrics["val_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_evaluate_on_a_mixed_demo_split(make_model, tmp_path):
    make_demo(tmp_path / "demo", n=360, seed=1, conversations=210)
    images = str(tmp_path / "demo" / "images")
    dataset = make_dataset(
        [
            {
                "format": "coco",
                "annotation_file": str(tmp_path / "demo" / "captions_val.json"),
                "image_directory": images,
            },
            {
                "format": "llava",
                "annotation_file": str(tmp_path / "demo" / "conversations_val.json"),
                "image_directory": images,
            },
        ]
    )
    model = make_model()
    metrics, results = evaluate(model, dataset, limit=8, batch_size=4, max_new_tokens=4)
    assert metrics["images"] == 8 and len(results["captions"]) == 8
    assert {"image_id", "caption"} <= set(results["captions"][0])
    assert metrics["answered_turns"] == 24 == len(results["answers"])  # 8 conversations x 3 questions
    assert {"question", "answer", "reference", "correct"} <= set(results["answers"][0])
    assert math.isclose(metrics["perplexity"], math.exp(metrics["val_loss"]), rel_tol=1e-6)
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["answer_accuracy"] <= 1.0


# max_new_tokens 1 with <|end|>: a reply whose stop token is its last allowed token was not cut
@pytest.mark.parametrize("says, max_new_tokens, cut", [("<|end|>", 3, 0), ("<|end|>", 1, 0), ("red", 3, 4)])
def test_replies_that_reach_max_new_tokens_before_a_stop_token_are_counted(
    make_model, demo_dir, caplog, says, max_new_tokens, cut
):
    sources = [("coco", "captions_val.json"), ("llava", "conversations_val.json")]
    images = str(demo_dir / "images")
    dataset = make_dataset(
        [{"format": f, "annotation_file": str(demo_dir / name), "image_directory": images} for f, name in sources]
    )
    model = make_model()
    # A model that only ever says `says`: its logits come from a bias alone
    token = model.tokenizer.convert_tokens_to_ids(says if says.startswith("<") else model.tokenizer.tokenize(says)[0])
    head = torch.nn.Linear(model.text_model.config.hidden_size, model.text_model.config.vocab_size)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    with torch.no_grad():
        head.bias[token] = 1.0
    model.text_model.lm_head = head
    metrics, results = evaluate(model, dataset, limit=4, batch_size=4, max_new_tokens=max_new_tokens)
    assert metrics["images"] == 4 and metrics["answered_turns"] == 12  # 4 conversations x 3 questions
    assert (metrics["captions_at_max_new_tokens"], metrics["answers_at_max_new_tokens"]) == (cut, 3 * cut)
    assert ("before a stop token and were cut there" in caplog.text) == bool(cut)
    assert {reply["caption"] for reply in results["captions"]} == {
        model.tokenizer.decode([token] * max_new_tokens if cut else [])
    }


def test_evaluate_cli_reports_answer_accuracy_per_turn_on_a_llava_file(make_model, tmp_path, capsys):
    import evaluate as evaluate_cli

    model = make_model()
    questions = ["Which colour is it?", "What shape is it?", "Say hello.", "Which side is it on?"]
    replies = generate(model, [[{"role": "user", "content": q}] for q in questions], None, max_new_tokens=3)
    entries = []
    for i, (question, reply) in enumerate(zip(questions, replies)):
        reference = f" {reply.upper()}!" if i % 2 == 0 else reply + " no"  # equal once normalised / not equal
        conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": reference}]
        entries.append({"id": i, "conversations": conversation})
    # Its second question outgrows max_length (256): trained on cut there, but never answered from a cut prompt.
    long_talk = entries[0]["conversations"] + [
        {"from": "human", "value": "what colour " * 150},
        {"from": "gpt", "value": "x"},
    ]
    entries.append({"id": 4, "conversations": long_talk})
    (tmp_path / "talk.json").write_text(json.dumps(entries))
    config = {
        "checkpoint": {"output_dir": str(tmp_path / "unused")},
        "data": {"val": {"format": "llava", "annotation_file": str(tmp_path / "talk.json")}, "num_workers": 0},
    }
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    checkpoint = model.save_pretrained(tmp_path / "model")
    arguments = ["--checkpoint", str(checkpoint), "--config", str(tmp_path / "eval.yaml"), "--max_new_tokens", "3"]
    evaluate_cli.main([*arguments, "--batch_size", "3"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["answer_accuracy"] == 0.6 and metrics["answered_turns"] == 5
    assert metrics["answer_turns_too_long"] == 1
    assert math.isclose(metrics["perplexity"], math.exp(metrics["val_loss"]), rel_tol=1e-6)
    answers = json.loads((checkpoint / "answers_val.json").read_text())
    assert [answer["correct"] for answer in answers] == [True, False, True, False, True]
    assert "exact_match" not in metrics and not (checkpoint / "captions_val.json").exists()


def test_evaluate_output_puts_every_result_file_beside_it(make_model, tmp_path, capsys):
    import evaluate as evaluate_cli

    (tmp_path / "images").mkdir()
    for image_id in (1, 2):
        random_image(image_id).save(tmp_path / "images" / f"{image_id}.png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2)],
        "annotations": [{"id": i, "image_id": i, "caption": "a red circle"} for i in (1, 2)],
    }
    talk = [{"id": 0, "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]}]
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "talk.json").write_text(json.dumps(talk))
    sources = [
        {
            "format": "coco",
            "annotation_file": str(tmp_path / "captions.json"),
            "image_directory": str(tmp_path / "images"),
        },
        {"format": "llava", "annotation_file": str(tmp_path / "talk.json")},
    ]
    config = {"checkpoint": {"output_dir": str(tmp_path / "unused")}, "data": {"val": sources, "num_workers": 0}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    checkpoint = make_model().save_pretrained(tmp_path / "model")
    before = sorted(path.name for path in checkpoint.iterdir())
    results = tmp_path / "results"
    results.mkdir()
    arguments = ["--checkpoint", str(checkpoint), "--config", str(tmp_path / "eval.yaml")]
    evaluate_cli.main([*arguments, "--output", str(results / "p2.json"), "--max_new_tokens", "2"])
    metrics = json.loads(capsys.readouterr().out)
    assert sorted(path.name for path in results.iterdir()) == ["p2.json", "p2_answers.json", "p2_metrics.json"]
    assert sorted(path.name for path in checkpoint.iterdir()) == before  # nothing written into the checkpoint
    assert [entry["image_id"] for entry in json.loads((results / "p2.json").read_text())] == [1, 2]
    assert [answer["reference"] for answer in json.loads((results / "p2_answers.json").read_text())] == ["hello"]
    assert json.loads((results / "p2_metrics.json").read_text()) == metrics
    settings = metrics["settings"]  # enough to run it again and to compare it with another run
    assert (settings["checkpoint"], settings["split"], settings["limit"]) == (str(checkpoint.resolve()), "val", None)
    assert (settings["decoding"], settings["max_new_tokens"]) == ("greedy", 2)
    assert [source["annotation_file"] for source in settings["data"]] == [s["annotation_file"] for s in sources]
    assert settings["versions"]["torch"] and settings["versions"]["pycocoevalcap"]
    assert metrics["caption_tokenizer"] in {"ptb", "simple"}
    assert (metrics["results_file"], metrics["answers_file"]) == (
        str(results / "p2.json"),
        str(results / "p2_answers.json"),
    )


def test_evaluate_skips_a_bad_image_and_answers_turns_before_the_image_is_shown(make_model, tmp_path, capsys):
    import evaluate as evaluate_cli

    (tmp_path / "images").mkdir()
    for image_id in (1, 2):
        random_image(image_id).save(tmp_path / "images" / f"{image_id}.png")
    (tmp_path / "images" / "3.png").write_bytes(b"not a png")
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png"} for i in (1, 2, 3)],
        "annotations": [{"id": i, "image_id": i, "caption": "a red circle"} for i in (1, 2, 3)],
    }
    turns = [("human", "Say hello."), ("gpt", "hello"), ("human", "<image>\nWhich colour?"), ("gpt", "red")]
    talk = [{"id": 0, "image": "1.png", "conversations": [{"from": f, "value": v} for f, v in turns]}]
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "talk.json").write_text(json.dumps(talk))
    images = str(tmp_path / "images")
    sources = [
        {"format": "coco", "annotation_file": str(tmp_path / "captions.json"), "image_directory": images},
        {"format": "llava", "annotation_file": str(tmp_path / "talk.json"), "image_directory": images},
    ]
    config = {"checkpoint": {"output_dir": str(tmp_path / "unused")}, "data": {"val": sources, "num_workers": 0}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    checkpoint = make_model().save_pretrained(tmp_path / "model")
    named = ["--checkpoint", str(checkpoint / "model_checkpoint.pt")]  # a file named inside it, as the original did
    arguments = ["--config", str(tmp_path / "eval.yaml"), "--max_new_tokens", "2"]
    evaluate_cli.main(named + arguments)
    metrics = json.loads(capsys.readouterr().out)
    assert (metrics["images"], metrics["bad_images"], metrics["answered_turns"]) == (2, 1, 2)
    assert json.loads((checkpoint / "metrics_val.json").read_text()) == metrics
    for source in sources:
        source["on_bad_image"] = "error"
    config["data"]["num_workers"] = 1  # the error comes from a DataLoader worker, wrapped in its traceback
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli.main(["--checkpoint", str(checkpoint), *arguments])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "3.png: cannot be decoded as an image" in error and len(error.splitlines()) == 1


def test_generate_of_no_prompts_is_no_replies(make_model):
    model = make_model()
    assert generate(model, [], []) == [] and generate(model, []) == []
    with pytest.raises(ValueError, match=r"^0 prompts but 1 images: give one image \(or list\) per prompt$"):
        generate(model, [], [random_image(0)])


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_generate_cli_prints_the_caption(make_model, tmp_path, capsys, stream):
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
            *stream,
        ]
    )
    printed = capsys.readouterr().out.strip()
    reloaded = PhiClipMLLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        expected = generate_cli.generate(reloaded, generate_cli.DEFAULT_PROMPT, [tmp_path / "photo.png"], 5)[0]
    assert printed == expected
    llava_style = generate_cli.DEFAULT_PROMPT.replace(IMAGE_TOKEN, "<image>")  # LLaVA's marker means the same
    generate_cli.main(
        ["--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "photo.png")]
        + ["--max_new_tokens", "5", "--device", "cpu", "--prompt", llava_style, *stream]
    )
    assert capsys.readouterr().out.strip() == expected
