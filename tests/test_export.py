"""export.py: a phase-two checkpoint as transformers' own Llava (logits, greedy tokens, processor), merged export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import PHI3_TOKENIZER, ROOT, TINY_TEXT, random_image, require_shared, tiny_config
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import export
from export import export_llava, unsupported_by_llava
from model import IMAGE_TOKEN, PhiClipMLLM, generate

TEXT_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj"], "lora_dropout": 0.0}
VISION_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "out_proj", "fc1"], "lora_dropout": 0.0}
# Llava-shaped variants: an MLP as wide as the LM (Llava's own shape) without CLS, a narrower MLP with CLS (zero-
# padded to Llava's width), and a single Linear layer (written as Linear-ReLU-Linear).
VARIANTS = {
    "mlp_llava": dict(adapter_dim=TINY_TEXT["hidden_size"], keep_cls=False),
    "mlp_narrow_cls": dict(adapter_dim=48, keep_cls=True, adapter_activation="silu"),
    "linear": dict(adapter_dim=None, keep_cls=True),
}


def phase_two_checkpoint(tokenizer_dir, directory, seed: int = 0, **overrides):
    """A tiny Llava-shaped model after phase one + a few phase-two steps (LoRA on both backbones), saved."""
    torch.manual_seed(seed)
    config = tiny_config(tokenizer_dir, **{"vision_feature_layer": -2, "normalize": False, **overrides})
    model = PhiClipMLLM(config).prime_model("one")
    model.setup_lora({**TEXT_LORA, "init_lora_weights": False}, {**VISION_LORA, "init_lora_weights": False})
    batch = model.processor(
        [f"Describe this image. {IMAGE_TOKEN}", f"What is shown in this picture? {IMAGE_TOKEN}"],
        [random_image(10), random_image(11)],
        ["a red circle", "two blue squares"],
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tiny_tokenizer_dir, tmp_path_factory):
    """(our model reloaded from the checkpoint, the Llava directory exported from it)."""
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = phase_two_checkpoint(tiny_tokenizer_dir, root / "p2", **VARIANTS[request.param])
    out = export_llava(checkpoint, root / "llava", dtype=torch.float32)
    return PhiClipMLLM.from_pretrained(checkpoint).eval(), out


def conversations_and_images():
    """A mixed batch: captions with the image after or before the text, text only, and a multi-turn chat."""
    images = [random_image(i) for i in range(4)]
    ours = [
        [{"role": "user", "content": f"Describe this image. {IMAGE_TOKEN}"}],
        [{"role": "user", "content": "Hello, what colour?"}],
        [{"role": "user", "content": f"{IMAGE_TOKEN} What is shown in this picture? Please answer briefly."}],
        [
            {"role": "user", "content": f"What is this? {IMAGE_TOKEN}"},
            {"role": "assistant", "content": "a red circle"},
            {"role": "user", "content": f"And this one? {IMAGE_TOKEN}"},
        ],
    ]
    ours_images = [[images[0]], [], [images[1]], [images[2], images[3]]]

    def image(index):
        return {"type": "image", "image": images[index]}

    def text(value):
        return {"type": "text", "text": value}

    theirs = [
        [{"role": "user", "content": [text("Describe this image."), image(0)]}],
        [{"role": "user", "content": [text("Hello, what colour?")]}],  # a list: transformers 5.0 needs one
        [{"role": "user", "content": [image(1), text("What is shown in this picture? Please answer briefly.")]}],
        [
            {"role": "user", "content": [text("What is this?"), image(2)]},
            {"role": "assistant", "content": [text("a red circle")]},
            {"role": "user", "content": [text("And this one?"), image(3)]},
        ],
    ]
    return ours, ours_images, theirs


class TokenRecorder:
    """A generate() streamer that keeps the new token ids of every row."""

    def __init__(self):
        self.steps, self.prompt = [], None

    def put(self, value):
        if self.prompt is None:  # the first call hands over the prompt's ids
            self.prompt = value
        else:
            self.steps.append(value.reshape(-1))

    def end(self):
        pass

    def ids(self):
        return torch.stack(self.steps, dim=1)


def test_llava_directory_loads_natively_with_the_expected_files(exported):
    ours, out = exported
    files = sorted(path.name for path in out.iterdir())
    assert {"config.json", "generation_config.json", "processor_config.json", "chat_template.jinja"} <= set(files)
    assert any(name.endswith(".safetensors") for name in files) and not any(name.endswith(".bin") for name in files)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and "auto_map" not in config
    assert config["vision_feature_layer"] == -1 and config["vision_config"]["num_hidden_layers"] == 2  # cut tower
    assert config["vision_feature_select_strategy"] == ("full" if ours.config.keep_cls else "default")
    assert config["image_token_index"] == ours.image_token_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == ours.processor.stop_token_ids and not generation["do_sample"]
    card = (out / "README.md").read_text()
    assert "LlavaForConditionalGeneration" in card and "LoRA (merged)" in card


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_exported_logits_equal_ours(exported, padding_side):
    ours, out = exported
    llava = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    conversations, images, theirs = conversations_and_images()
    batch = ours.processor(conversations=conversations, images=images, padding_side=padding_side)
    inputs = processor.apply_chat_template(
        theirs,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,  # a keyword of its own: transformers 5.0 has no processor_kwargs
        padding_side=padding_side,
    )
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(inputs[key], batch[key]), key
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"])
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() derives them
    with torch.no_grad():
        our_logits = ours(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        peer_logits = llava(**inputs, position_ids=positions).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(peer_logits[real], our_logits[real], atol=1e-4, rtol=0)


def test_exported_greedy_generation_equals_ours_token_for_token(exported):
    ours, out = exported
    llava = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    conversations, images, theirs = conversations_and_images()
    recorder = TokenRecorder()
    texts = generate(ours, conversations, images, max_new_tokens=10, streamer=recorder)
    inputs = processor.apply_chat_template(
        theirs,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding=True,  # left by default, whatever side the training tokenizer padded on (the tiny one: right)
    )
    with torch.no_grad():
        output = llava.generate(**inputs, max_new_tokens=10)  # greedy and stop tokens from generation_config.json
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(new_tokens, recorder.ids())
    assert [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)] == texts


@pytest.mark.parametrize("prompt_format", ["chat", "seed"])
def test_processor_chat_template_writes_our_prompts_with_the_phi3_tokenizer(tmp_path, prompt_format):
    tokenizer_dir = require_shared(PHI3_TOKENIZER)
    text = {**TINY_TEXT, "vocab_size": len(AutoTokenizer.from_pretrained(tokenizer_dir))}
    torch.manual_seed(0)
    config = tiny_config(tokenizer_dir, text_model=text, normalize=False, prompt_format=prompt_format)
    PhiClipMLLM(config).save_pretrained(tmp_path / "ckpt")
    # The original named a file inside the checkpoint, which means the checkpoint (as for from_pretrained).
    out = export_llava(tmp_path / "ckpt" / "model_checkpoint.pt", tmp_path / "llava", dtype=torch.float32)
    ours, processor = PhiClipMLLM.from_pretrained(tmp_path / "ckpt"), AutoProcessor.from_pretrained(out)
    conversations, images, theirs = conversations_and_images()
    for generation_prompt in (False, True):
        expected = ours.processor(
            conversations=conversations, images=images, padding_side="left", add_generation_prompt=generation_prompt
        )
        inputs = processor.apply_chat_template(
            theirs,
            add_generation_prompt=generation_prompt,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        assert torch.equal(inputs["input_ids"], expected["input_ids"])


def test_settings_llava_cannot_compute_are_refused():
    assert unsupported_by_llava({"normalize": False, "adapter_dim": 64}, 64, 32) is None
    assert unsupported_by_llava({"normalize": False, "adapter_dim": None}, 64, 32) is None
    assert "model.normalize: true" in unsupported_by_llava({"normalize": True}, None, None)
    assert "model.adapter_dim=96 is wider than" in unsupported_by_llava({"normalize": False, "adapter_dim": 96}, 64, 32)
    assert "twice the vision width" in unsupported_by_llava({"normalize": False, "adapter_dim": None}, 48, 32)


def test_command_line_writes_shards_and_refuses_bad_input(tiny_tokenizer_dir, tmp_path):
    checkpoint = phase_two_checkpoint(tiny_tokenizer_dir, tmp_path / "p2", **VARIANTS["mlp_llava"])
    (checkpoint / "metrics_val.json").write_text(json.dumps({"exact_match": 0.625, "images": 8, "results_file": "x"}))
    (checkpoint / "metrics_train.json").write_text('{"exact_match": 0.')  # evaluate.py killed while writing it
    training = {
        "checkpoint": {"output_dir": "out", "load_dir": "p1"},
        "data": {  # train: a list of sources mixed into one set (as tiny_p2.yaml); val: one source
            "train": [
                {"format": "coco", "annotation_file": "captions.json", "image_directory": "images"},
                {"format": "llava", "annotation_file": "talk.json", "image_directory": "images"},
            ],
            "val": {"format": "cc_sbu_align", "data_dir": "cc_sbu"},
        },
        "training_args": {"max_steps": 600, "learning_rate": 2e-4},
        "peft_text": {"r": 4, "target_modules": ["qkv_proj"]},
    }
    (tmp_path / "p2.yaml").write_text(json.dumps(training))  # YAML is a superset of JSON
    command = [sys.executable, "export.py", "--checkpoint", str(checkpoint)]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "llava"), "--dtype", "float32", "--max_shard_size", "100KB"]
        + ["--config", str(tmp_path / "p2.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(tmp_path / "llava") and "check: the Llava's logits equal" in result.stderr
    shards = sorted((tmp_path / "llava").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "llava" / "model.safetensors.index.json").is_file()
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").dtype == torch.float32
    card = (tmp_path / "llava" / "README.md").read_text()
    assert "- val: exact_match 0.625, images 8" in card and "- train:" not in card
    assert f"warning: {checkpoint / 'metrics_train.json'}: not a metrics JSON object" in result.stderr
    assert (
        "- train data: coco `captions.json`\n- train data: llava `talk.json`\n- val data: cc_sbu_align `cc_sbu`" in card
    )
    assert "600 steps" in card

    values = json.loads((checkpoint / "config.json").read_text())
    (tmp_path / "normalized").mkdir()
    (tmp_path / "normalized" / "config.json").write_text(json.dumps({**values, "normalize": True}))
    (tmp_path / "normalized" / "adapter.safetensors").write_bytes(b"")  # never read: refused before loading
    cases = [
        (["--out", str(tmp_path / "llava")], "exists and is not an empty directory"),
        (["--out", str(tmp_path / "x"), "--format", "phiclip"], "--format phiclip writes a standalone"),
        (["--out", str(tmp_path / "x"), "--dtype", "int8"], "invalid choice: 'int8'"),
    ]
    for arguments, expected in cases:
        result = subprocess.run([*command, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    result = subprocess.run(
        [sys.executable, "export.py", "--checkpoint", str(tmp_path / "normalized"), "--out", str(tmp_path / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
    assert "model.normalize: true" in result.stderr and "--format phiclip --merge" in result.stderr


@pytest.mark.parametrize("format_", [["--format", "llava"], ["--format", "phiclip", "--merge"]])
def test_a_missing_lora_directory_is_one_error_line(tiny_tokenizer_dir, tmp_path, capsys, format_):
    checkpoint = phase_two_checkpoint(tiny_tokenizer_dir, tmp_path / "p2")
    shutil.rmtree(checkpoint / "lora_vision")
    named = checkpoint / "model_checkpoint.pt"  # a file named inside the checkpoint means it, as in from_pretrained
    with pytest.raises(SystemExit) as exited:
        export.main(["--checkpoint", str(named), "--out", str(tmp_path / "out"), *format_])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0] == f"error: {checkpoint}/lora_vision: LoRA adapter missing (config.json records lora_vision)"
    assert not (tmp_path / "out").exists()


def test_a_config_json_that_is_not_an_object_is_one_error_line(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("[]")  # valid JSON, but no model's settings
    (tmp_path / "ckpt" / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        export.main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert (
        lines[0]
        == f"error: {tmp_path / 'ckpt' / 'config.json'}: expected a JSON object (the model's settings), got list"
    )


def test_merged_phiclip_export_is_standalone_and_equal(tiny_tokenizer_dir, tmp_path):
    # normalize: true has no Llava form, but the merged PhiClip checkpoint keeps every setting.
    checkpoint = phase_two_checkpoint(tiny_tokenizer_dir, tmp_path / "p2", normalize=True)
    result = subprocess.run(
        [sys.executable, "export.py", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "merged")]
        + ["--format", "phiclip", "--merge"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["lora_text"] is None and config["lora_vision"] is None
    assert sorted(config["saved_backbones"]) == ["text_model", "vision_model"]
    assert not (tmp_path / "merged" / "lora_text").exists() and not (tmp_path / "merged" / "lora_vision").exists()
    unmerged, merged = PhiClipMLLM.from_pretrained(checkpoint).eval(), PhiClipMLLM.from_pretrained(tmp_path / "merged")
    conversations, images, _ = conversations_and_images()
    batch = unmerged.processor(conversations=conversations, images=images)
    with torch.no_grad():
        inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        torch.testing.assert_close(merged.eval()(*inputs).logits, unmerged(*inputs).logits, atol=1e-5, rtol=0)
