"""Model core: Llava equivalence, labels, checkpoints, phases, errors, generate()."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import PHI3_TOKENIZER, TINY_TEXT, TINY_VISION, random_image, require_shared, tiny_config
from PIL import Image
from transformers import AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from config import ConfigError
from generate import generate
from model import IMAGE_TOKEN, PhiClipMLLM, PhiClipProcessor

PROMPTS = [
    f"Describe this image. {IMAGE_TOKEN}",
    f"What is shown in this picture? Please answer briefly and in detail {IMAGE_TOKEN}",
    f"Hello {IMAGE_TOKEN} what colour?",
]
ANSWERS = ["a red circle", "two blue squares on the left", "It is blue."]
TEXT_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj", "o_proj"], "lora_dropout": 0.0}
VISION_LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "out_proj"], "lora_dropout": 0.0}


def llava_twin(ours: PhiClipMLLM) -> LlavaForConditionalGeneration:
    """transformers' Llava with our (Llava-shaped) model's weights copied over."""
    vision_values = {k: v for k, v in TINY_VISION.items() if k != "model_type"}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision_values),
        text_config=ours.text_model.config,
        image_token_id=ours.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=ours.num_image_tokens,
    )
    llava = LlavaForConditionalGeneration(config).eval()
    # Ours stops the tower at the feature layer, so Llava's unused last layer stays random: strict=False.
    missing, unexpected = llava.model.vision_tower.load_state_dict(ours.vision_model.state_dict(), strict=False)
    assert not unexpected and all(".layers.2." in key for key in missing)
    llava.model.multi_modal_projector.linear_1.load_state_dict(ours.vision_adapter.layers[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(ours.vision_adapter.layers[2].state_dict())
    llava.model.language_model.load_state_dict(ours.text_model.get_decoder().state_dict())
    llava.lm_head.load_state_dict(ours.text_model.get_output_embeddings().state_dict())
    return llava


@pytest.fixture
def llava_shaped(make_model):
    return make_model(vision_feature_layer=-2, keep_cls=False, adapter_dim=TINY_TEXT["hidden_size"], normalize=False)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_logits_match_llava(llava_shaped, padding_side):
    ours, images = llava_shaped, [random_image(i) for i in range(3)]
    llava = llava_twin(ours)
    batch = ours.processor(PROMPTS, images, ANSWERS, padding_side=padding_side)
    assert ours.num_image_tokens == 16 and (batch["input_ids"] == ours.image_token_id).sum() == 48
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        our_logits = ours(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
        peer_logits = llava(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            position_ids=positions,
        ).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(our_logits[real], peer_logits[real], atol=1e-4, rtol=0)


def test_greedy_generate_matches_llava(llava_shaped):
    ours, images = llava_shaped, [random_image(i) for i in range(3)]
    llava = llava_twin(ours)
    batch = ours.processor(PROMPTS, images, padding_side="left", add_generation_prompt=True)
    stop = ours.processor.stop_token_ids
    with torch.no_grad():
        peer = llava.generate(
            **batch, max_new_tokens=8, do_sample=False, eos_token_id=stop, pad_token_id=ours.processor.pad_token_id
        )
    peer_texts = [t.strip() for t in ours.tokenizer.batch_decode(peer[:, batch["input_ids"].shape[1] :], True)]
    assert generate(ours, PROMPTS, images, max_new_tokens=8) == peer_texts


@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 3, "length_penalty": 0.5, "min_new_tokens": 4},
        {"repetition_penalty": 5.0},  # these two look at the prompt's tokens too
        {"no_repeat_ngram_size": 1},
    ],
)
def test_other_generation_arguments_reach_the_lm_as_for_llava(llava_shaped, options):
    ours, images = llava_shaped, [random_image(i) for i in range(3)]
    llava = llava_twin(ours)
    batch = ours.processor(PROMPTS, images, padding_side="left", add_generation_prompt=True)
    options = {"max_new_tokens": 8} | options
    with torch.no_grad():
        peer = llava.generate(
            **batch, **options, eos_token_id=ours.processor.stop_token_ids, pad_token_id=ours.processor.pad_token_id
        )
    peer_texts = [t.strip() for t in ours.tokenizer.batch_decode(peer[:, batch["input_ids"].shape[1] :], True)]
    assert generate(ours, PROMPTS, images, **options) == peer_texts


def test_loss_matches_full_logits_cross_entropy(make_model):
    model = make_model()
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    loss = model(**batch).loss
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"]).logits
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(loss, reference)


def _supervised_text(processor, batch, row):
    labels = batch["labels"][row]
    return processor.tokenizer.decode(labels[labels != -100])


@pytest.mark.parametrize("prompt_format,end", [("chat", "<|end|>"), ("seed", "<|endoftext|>")])
@pytest.mark.parametrize("which", ["tiny", "phi3"])
def test_labels_are_answer_plus_end_token(tiny_tokenizer_dir, prompt_format, end, which):
    path = tiny_tokenizer_dir if which == "tiny" else require_shared(PHI3_TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(path)
    from model import image_processor_class

    processor = PhiClipProcessor(tokenizer, image_processor_class()(), num_image_tokens=5, prompt_format=prompt_format)
    answers = ["A man riding a horse on a beach.", "two blue squares on the left", "It is blue."]
    batch = processor(PROMPTS, [random_image(i) for i in range(3)], answers)
    for row, answer in enumerate(answers):
        assert _supervised_text(processor, batch, row) == answer + end
        image_positions = (batch["input_ids"][row] == processor.image_token_id).nonzero().flatten()
        assert len(image_positions) == 5 and image_positions[-1] - image_positions[0] == 4  # one contiguous span
    assert batch["pixel_values"].shape[0] == 3


def test_multi_turn_labels_cover_assistant_turns_only(make_model):
    processor = make_model().processor
    conversation = [
        {"role": "user", "content": f"What is this? {IMAGE_TOKEN}"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "And its colour?"},
        {"role": "assistant", "content": "red"},
    ]
    batch = processor(conversations=[conversation, conversation[:2]], images=[[random_image(0)], [random_image(1)]])
    assert _supervised_text(processor, batch, 0) == "a red circle<|end|>red<|end|>"
    assert _supervised_text(processor, batch, 1) == "a red circle<|end|>"


@pytest.mark.parametrize("prompt_format", ["chat", "seed"])
def test_processor_edge_inputs(make_model, prompt_format):
    processor = make_model(prompt_format=prompt_format).processor
    end = {"chat": "<|end|>", "seed": "<|endoftext|>"}[prompt_format]
    assert processor.stop_token_ids == sorted(processor.tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"]))
    # An answer at position 0 cannot be predicted: never supervised, so Trainer's token count is the model's.
    batch = processor(conversations=[[{"role": "assistant", "content": "hello there"}]])
    assert batch["labels"][0, 0] == -100 and _supervised_text(processor, batch, 0).endswith(end)
    for bad in ([{"content": "hi"}], ["hello"], [{"role": "user", "content": None}]):
        with pytest.raises(ValueError, match="a conversation turn is"):
            processor(conversations=[bad])
    # A prompt string already in chat markup is taken verbatim; the chat format adds the reply prompt once.
    for markup in ("<|user|>\nhi<|end|>\n", "<|user|>\nhi<|end|>\n<|assistant|>\n"):
        text = processor.tokenizer.decode(processor(markup, add_generation_prompt=True)["input_ids"][0])
        assert text.count("<|assistant|>") == (1 if prompt_format == "chat" else markup.count("<|assistant|>"))
    # A conversation's message that quotes markup is a message like any other: wrapped as one.
    quoted, _ = processor.format_conversation([{"role": "user", "content": "what does <|user|> mean?"}], True)
    plain, _ = processor.format_conversation([{"role": "user", "content": "what does X mean?"}], True)
    assert quoted == plain.replace("X", "<|user|>")
    # Text that is not Unicode (half an emoji from a JSON escape, or a terminal's undecodable byte) is one error.
    for bad in ("a dog \ud83d here", "caf\udce9 <|placeholder1|>"):
        with pytest.raises(ValueError, match="user turn's text is not valid Unicode: surrogates not allowed after"):
            processor([bad], [Image.new("RGB", (8, 8))] if "placeholder" in bad else None)


def test_max_length_defaults_to_what_the_language_model_can_take(make_model, tmp_path, caplog):
    model = make_model(max_length=None)  # 1024 by default, but this LM has 512 positions
    assert model.config.max_length == model.processor.max_length == TINY_TEXT["max_position_embeddings"] == 512
    with pytest.raises(ConfigError, match="model.max_length=600 is longer than the text model's 512 positions"):
        make_model(max_length=600)
    model.save_pretrained(tmp_path / "ckpt")
    stored = json.loads((tmp_path / "ckpt" / "config.json").read_text()) | {"max_length": 1024}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(stored))  # written before the check existed
    assert PhiClipMLLM.from_pretrained(tmp_path / "ckpt").config.max_length == 512  # still loads, capped
    assert "using 512" in caplog.text
    caplog.clear()
    with pytest.raises(ConfigError, match="model.max_length=1024 is longer"):  # asked for now: an error
        PhiClipMLLM.from_pretrained(tmp_path / "ckpt", max_length=1024)
    assert not caplog.text  # and only that: no warning first that it loads as 512 from the checkpoint's file


def test_normalized_adapter_gives_unit_vectors_per_image_token(make_model):
    model = make_model(normalize=True)
    with torch.no_grad():
        features = model.encode_images(model.processor([PROMPTS[0]], [random_image(0)])["pixel_values"])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(features.shape[:2]))


def test_mixed_text_only_and_image_batch(make_model):
    model = make_model()
    batch = model.processor(["Hello, what colour?", PROMPTS[0]], [None, random_image(0)], ["blue", "a red circle"])
    assert batch["pixel_values"].shape[0] == 1
    assert torch.isfinite(model(**batch).loss)


def _assert_same_logits(a, b, batch):
    with torch.no_grad():
        torch.testing.assert_close(a(**batch).logits, b(**batch).logits, atol=0, rtol=0)


def test_checkpoint_round_trip_phase_one(make_model, tmp_path):
    model = make_model().prime_model("one")
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    model.save_pretrained(tmp_path / "p1")
    _assert_same_logits(model, PhiClipMLLM.from_pretrained(tmp_path / "p1" / "model_checkpoint.pt").eval(), batch)
    with pytest.raises(FileNotFoundError, match="checkpoint-999: no such checkpoint directory"):
        PhiClipMLLM.from_pretrained(tmp_path / "p1" / "checkpoint-999")  # not p1 instead
    legacy = json.loads((tmp_path / "p1" / "config.json").read_text()) | {"attn_implementation": "flex_attention"}
    (tmp_path / "p1" / "config.json").write_text(json.dumps(legacy))  # accepted before flex_attention was dropped
    legacy_model = PhiClipMLLM.from_pretrained(tmp_path / "p1").eval()
    assert legacy_model.config.attn_implementation == "sdpa"  # tiny configs here run eager: close, not bit-equal
    with torch.no_grad():
        torch.testing.assert_close(legacy_model(**batch).logits, model(**batch).logits)
    with pytest.raises(ValueError, match="keeps the tokenizer its embeddings were trained with"):
        PhiClipMLLM.from_pretrained(tmp_path / "p1", tokenizer=str(tmp_path / "another_tokenizer"))


def test_checkpoint_round_trip_phase_two_unmerged_and_merged(make_model, tmp_path):
    model = make_model().prime_model("one")
    model.setup_lora({**TEXT_LORA, "init_lora_weights": False}, {**VISION_LORA, "init_lora_weights": False})
    model.eval()
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    model.save_pretrained(tmp_path / "p2")
    assert (tmp_path / "p2" / "lora_text" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "p2" / "lora_vision" / "adapter_model.safetensors").is_file()
    reloaded = PhiClipMLLM.from_pretrained(tmp_path / "p2").eval()
    _assert_same_logits(model, reloaded, batch)
    with torch.no_grad():
        unmerged = model(**batch).logits
    (tmp_path / "p2" / "checkpoint-500").mkdir()  # a run's or a user's files beside the model
    (tmp_path / "p2" / "notes.txt").write_text("mine")
    (tmp_path / "p2" / "metrics_val.json").write_text("{}")  # evaluate.py's figures of the model replaced
    (tmp_path / "p2" / "config.json").unlink()  # as if an earlier replacement was killed halfway
    model.save_pretrained(tmp_path / "p2", merge_lora=True)  # over the unmerged model
    merged = PhiClipMLLM.from_pretrained(tmp_path / "p2").eval()
    assert not (tmp_path / "p2" / "lora_text").exists() and (tmp_path / "p2" / "checkpoint-500").is_dir()
    assert (tmp_path / "p2" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "p2" / "metrics_val.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p2"]  # no staging left behind
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, unmerged, atol=1e-5, rtol=0)


def test_phase_one_checkpoint_of_local_backbones_holds_no_backbone_tensors(make_model, tiny_tokenizer_dir, tmp_path):
    source = make_model()
    source.text_model.save_pretrained(tmp_path / "phi")
    source.vision_model.save_pretrained(tmp_path / "clip")
    config = tiny_config(tiny_tokenizer_dir, text_model=str(tmp_path / "phi"), vision_model=str(tmp_path / "clip"))
    model = PhiClipMLLM(config).prime_model("one").eval()
    model.save_pretrained(tmp_path / "ckpt")
    tensors = sorted(p.name for p in (tmp_path / "ckpt").rglob("*.safetensors"))
    assert tensors == ["adapter.safetensors"]
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    _assert_same_logits(model, PhiClipMLLM.from_pretrained(tmp_path / "ckpt").eval(), batch)


def test_trainable_parameters_and_gradients(make_model):
    model = make_model()
    vision, hidden, adapter_dim, layers = 32, 64, 48, TINY_TEXT["num_hidden_layers"]
    adapter = vision * adapter_dim + adapter_dim + adapter_dim * hidden + hidden
    assert model.prime_model("one").parameter_counts()["trainable"] == adapter
    model.setup_lora(TEXT_LORA, VISION_LORA)
    r = 4
    text_lora = layers * (r * hidden + 3 * hidden * r + r * hidden + hidden * r)  # qkv_proj (64->192), o_proj
    vision_lora = TINY_VISION["num_hidden_layers"] * 3 * (r * vision + vision * r)  # q, v, out (32->32)
    assert model.parameter_counts()["trainable"] == adapter + text_lora + vision_lora

    model.train()
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    model(**batch).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    lora_b = [n for n in trainable if "lora_B" in n]
    assert any(n.startswith("vision_model") for n in lora_b) and any(n.startswith("text_model") for n in lora_b)
    params = dict(model.named_parameters())
    assert all(params[n].grad.abs().sum() > 0 for n in lora_b)  # ViT LoRA is not blocked by a no_grad

    torch.optim.AdamW([params[n] for n in trainable], lr=1e-3).step()
    model.zero_grad()
    model(**batch).loss.backward()
    assert all(params[n].grad.abs().sum() > 0 for n in trainable if "lora_" in n)
    half = PhiClipMLLM(model.config.__class__.from_dict(make_model().config.to_dict()), dtype=torch.bfloat16)
    assert next(half.setup_lora(TEXT_LORA).vision_adapter.parameters()).dtype == torch.float32  # mixed precision


def test_a_bfloat16_model_feeds_its_fp32_adapter_in_training_and_generation(tiny_tokenizer_dir):
    # As the README's notebook loads a checkpoint (dtype=torch.bfloat16), with no autocast around it: the adapter
    # stays fp32 for training, so the bf16 tower's features must be cast on their way in, and its output back.
    torch.manual_seed(0)
    model = PhiClipMLLM(tiny_config(tiny_tokenizer_dir), dtype=torch.bfloat16).prime_model("one").train()
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    assert next(model.vision_adapter.parameters()).dtype == torch.float32
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in model.vision_adapter.parameters())
    replies = generate(model, PROMPTS[:2], [random_image(0), random_image(1)], max_new_tokens=3)
    assert len(replies) == 2 and all(isinstance(reply, str) for reply in replies)


def test_gradient_checkpointing_gives_the_same_gradients(make_model):
    batch = None
    grads = []
    for checkpointing in (False, True):
        model = make_model().setup_lora(TEXT_LORA, VISION_LORA).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        batch = batch or model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
        model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


def test_truncated_away_answer_is_never_trained_on_silently(make_model, caplog):
    model = make_model()
    prompt_length = model.processor([PROMPTS[0]], [random_image(0)], add_generation_prompt=True)["input_ids"].shape[1]
    model.processor.max_length = prompt_length  # room for the prompt, none for the answer
    with pytest.raises(ValueError, match="no supervised answer tokens"):
        model.processor([PROMPTS[0]], [random_image(0)], ["a red circle"])
    with caplog.at_level(logging.WARNING):
        batch = model.processor(
            [PROMPTS[0], f"Hi {IMAGE_TOKEN}"],
            [random_image(0), random_image(1)],
            ["a red circle", "a"],
            drop_unsupervised=True,
        )
    assert batch["input_ids"].shape[0] == 1 and batch["pixel_values"].shape[0] == 1
    assert (batch["labels"] != -100).any()
    assert "dropped 1 sample" in caplog.text


def test_bad_input_errors(make_model, tmp_path):
    processor = make_model().processor
    batch = processor([PROMPTS[0]], [random_image(0)], [ANSWERS[0]])
    processor.max_length = int((batch["input_ids"][0] == processor.image_token_id).nonzero().max())
    with pytest.raises(ValueError, match="would cut into the image"):  # by its last token
        processor.check([{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": ANSWERS[0]}], 1)
    model = make_model(max_length=40)
    with pytest.raises(ValueError, match=r"sample 0: 1 <\|placeholder1\|> placeholder\(s\) in the text but 2 image"):
        model.processor([PROMPTS[0]], [[random_image(0), random_image(1)]])
    with pytest.raises(ValueError, match=r"0 <\|placeholder1\|> placeholder\(s\) in the text but 1 image"):
        model.processor(["no placeholder here"], [random_image(0)])
    with pytest.raises(ValueError, match=r"sample 0 is \d+ tokens long .* max_length is 40"):
        model.processor([f"{'hello world ' * 20} {IMAGE_TOKEN}"], [random_image(0)], ["a"])
    batch = model.processor([PROMPTS[0]], [random_image(0)])
    with pytest.raises(ValueError, match=r"17 image-token positions .* but 0 images"):
        model(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no linear layer"):
        model.setup_lora(vision_lora={**VISION_LORA, "target_modules": ["q_proj", "o_proj"]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a PhiClipMLLM checkpoint"):
        PhiClipMLLM.from_pretrained(tmp_path / "empty")
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "adapter.safetensors").rename(tmp_path / "adapter_copy")
    with pytest.raises(FileNotFoundError, match="adapter.safetensors is missing"):
        PhiClipMLLM.from_pretrained(tmp_path / "ckpt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "model_checkpoint.pt")
    with pytest.raises(ValueError, match="pickled checkpoint"):
        PhiClipMLLM.from_pretrained(tmp_path / "model_checkpoint.pt")
    # A pickle that sits inside a checkpoint (a Trainer checkpoint-N's optimizer.pt) names that checkpoint.
    (tmp_path / "ckpt" / "adapter.safetensors").write_bytes((tmp_path / "adapter_copy").read_bytes())
    torch.save({"state": {}}, tmp_path / "ckpt" / "optimizer.pt")
    loaded = PhiClipMLLM.from_pretrained(tmp_path / "ckpt" / "optimizer.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.vision_adapter.parameters(), model.vision_adapter.parameters()))


def test_generate_takes_the_image_and_conversation_forms_a_notebook_has_and_names_the_rest(make_model):
    model, image = make_model(), random_image(0)
    expected = generate(model, PROMPTS[0], [image], max_new_tokens=4)
    pixels = np.asarray(image)
    assert generate(model, PROMPTS[0], [pixels], max_new_tokens=4) == expected  # an HxWx3 uint8 array
    grey = np.asarray(image.convert("L"))
    for grey_form in (grey, grey.astype(np.uint16) * 257):
        assert len(generate(model, PROMPTS[0], [grey_form], max_new_tokens=4)) == 1  # HxW arrays PIL reads
    one_channel = generate(model, PROMPTS[0], [grey[:, :, None]], max_new_tokens=4)  # HxWx1, as OpenCV keeps grey
    assert one_channel == generate(model, PROMPTS[0], [grey], max_new_tokens=4)
    conversation = [{"role": "user", "content": PROMPTS[0]}]
    assert generate(model, conversation, [image], max_new_tokens=4) == expected  # one conversation, not wrapped
    for bad, message in (
        (torch.rand(3, 56, 56), "an image is a file path, a PIL image or a uint8 array, got Tensor"),
        (pixels.astype(np.float64) / 255, r"an image array must be HxW or HxWxC uint8 \(as PIL reads\)"),
        (pixels.transpose(2, 0, 1).copy(), r"got \(3, 64, 72\) uint8"),
        ("http://images.cocodataset.org/val2017/1.jpg", "http://images.cocodataset.org/val2017/1.jpg: URLs are not"),
    ):
        with pytest.raises((TypeError, ValueError), match=message):
            generate(model, PROMPTS[0], [bad], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"\['eos_token_id'\] are set from the prompts and the checkpoint's stop"):
        generate(model, PROMPTS[0], [image], max_new_tokens=4, eos_token_id=3)
    with pytest.raises(ValueError, match="return_dict_in_generate is not supported: this returns the replies' text"):
        generate(model, PROMPTS[0], [image], max_new_tokens=4, return_dict_in_generate=True)
    history = [
        conversation[0],
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "hi " * 300},
    ]
    with pytest.raises(
        ValueError, match="max_length is 256: truncation would cut into the prompt"
    ):  # never from a cut one
        generate(model, [history], [[image]], max_new_tokens=4)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]}]
    with pytest.raises(
        ValueError, match=r"a conversation turn is \{'role': 'user' or 'assistant', 'content': 'text'\}"
    ):
        generate(model, parts, [image], max_new_tokens=4)


def test_batched_generate_equals_one_by_one(make_model):
    model = make_model()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], f"Hi {IMAGE_TOKEN}"]
    images = [random_image(i) for i in range(4)]
    batched = generate(model, prompts, images, max_new_tokens=6)
    assert batched == [generate(model, p, [im], max_new_tokens=6)[0] for p, im in zip(prompts, images)]
    assert len(generate(model, prompts[:2], images[:2], 4, True, num_return_sequences=2)) == 4


def test_generate_leaves_every_module_in_its_mode_and_a_loaded_model_in_eval_mode(make_model, tmp_path):
    model = make_model().prime_model("one")
    dropout = {"lora_dropout": 0.5, "init_lora_weights": False}
    model.setup_lora({**TEXT_LORA, **dropout}, {**VISION_LORA, **dropout})
    model.save_pretrained(tmp_path / "p2")
    loaded = PhiClipMLLM.from_pretrained(tmp_path / "p2")
    assert not any(module.training for module in loaded.modules())  # as transformers' from_pretrained
    batch = loaded.processor(PROMPTS[:1], [random_image(0)])
    with torch.no_grad():
        before = loaded(**batch).logits
    generate(loaded, PROMPTS[0], [random_image(0)], max_new_tokens=2)
    with torch.no_grad():  # LoRA dropout still off: the same logits, not dropout's noise
        assert torch.equal(loaded(**batch).logits, before)
    model.train()
    model.text_model.eval()  # a mix of modes, as a notebook may leave it, comes back as it was
    modes = [module.training for module in model.modules()]
    generate(model, PROMPTS[0], [random_image(0)], max_new_tokens=2)
    assert [module.training for module in model.modules()] == modes


def test_a_generation_prompt_with_earlier_answers_gives_full_logits(make_model):
    model = make_model()
    history = [
        {"role": "user", "content": PROMPTS[0]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "And its colour?"},
    ]
    batch = model.processor(conversations=[history], images=[[random_image(0)]], add_generation_prompt=True)
    assert sorted(batch) == ["attention_mask", "input_ids", "pixel_values"]
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.text_model.config.vocab_size)


def test_stop_strings_work_without_passing_the_tokenizer(make_model):
    model, image = make_model(), random_image(0)
    full = generate(model, PROMPTS[0], [image], max_new_tokens=8)[0]
    stop = full[1:4]  # a string the reply holds: generation ends where it is complete
    stopped = generate(model, PROMPTS[0], [image], max_new_tokens=8, stop_strings=[stop])[0]
    assert stop in stopped and full.startswith(stopped) and len(stopped) < len(full)


def test_trained_model_stops_at_end_token(make_model):
    model = make_model().train()
    batch = model.processor(PROMPTS[:2], [random_image(0), random_image(1)], ["a red circle"] * 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    assert generate(model, [PROMPTS[0]], [random_image(0)], max_new_tokens=20) == ["a red circle"]


def test_sdpa_computes_what_eager_computes_with_either_padding(make_model):
    eager, sdpa = make_model(attn_implementation="eager"), make_model(attn_implementation="sdpa")
    images = [random_image(i) for i in range(3)]
    for padding_side in ("right", "left"):
        batch = eager.processor(PROMPTS, images, ANSWERS, padding_side=padding_side)
        torch.testing.assert_close(sdpa(**batch).loss, eager(**batch).loss)
    assert generate(sdpa, PROMPTS, images, max_new_tokens=8) == generate(eager, PROMPTS, images, max_new_tokens=8)


def test_sdpa_with_contiguous_value_is_bit_identical_to_sdpa(make_model):
    # model.py hands SDPA a contiguous v so that backward does not pin Phi-3's fused qkv output (memory only).
    results = []
    for plain in (False, True):
        model = make_model(attn_implementation="sdpa").setup_lora(TEXT_LORA).train()
        assert model.text_model.config._attn_implementation == "sdpa_contiguous_value"
        if plain:
            model.text_model.set_attn_implementation("sdpa")
        batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=0, rtol=0)


def test_compiled_language_model_computes_the_same_loss_and_gradients(make_model):
    results = []
    for compiled in (False, True):
        model = make_model(attn_implementation="sdpa").setup_lora(TEXT_LORA).train()
        if compiled:
            model.compile_language_model(backend="eager")  # dynamo's tracing without inductor's slow CPU codegen
        batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name])


def test_compiled_language_model_compiles_once_for_training_and_never_for_generation(make_model):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = make_model(attn_implementation="sdpa").setup_lora(TEXT_LORA).train()
    counter = CompileCounter()
    model.compile_language_model(backend=counter)
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    model(**batch).loss.backward()
    assert counter.frame_count == 1  # one graph serves every decoder layer, LoRA inside
    with torch.no_grad():
        model.eval()(**batch)
    generate(model, PROMPTS[:2], [random_image(0), random_image(1)], max_new_tokens=4)
    assert counter.frame_count == 1  # evaluation and generation run eagerly: no per-layer KV-cache recompiles
    model.train()(**batch).loss.backward()
    assert counter.frame_count == 1


def test_fast_init_on_the_target_device_gives_transformers_init_and_trains(tiny_tokenizer_dir):
    # device= builds random backbones on the meta device and initialises them once, there (issue 12: 164 s -> s).
    config = tiny_config(tiny_tokenizer_dir, attn_implementation="sdpa")
    torch.manual_seed(0)
    reference = PhiClipMLLM(config).state_dict()  # transformers' from_config on the CPU
    built = {}
    for name, seed, dtype in (("fast", 0, None), ("again", 0, None), ("other", 1, None), ("bf16", 0, torch.bfloat16)):
        torch.manual_seed(seed)
        built[name] = PhiClipMLLM(config, dtype=dtype, device="cpu")
    fast = built["fast"].state_dict()
    assert fast.keys() == reference.keys()
    for key, expected in reference.items():
        tensor = fast[key]
        assert tensor.shape == expected.shape and tensor.dtype == expected.dtype and tensor.isfinite().all(), key
        assert torch.equal(tensor, built["again"].state_dict()[key]), key  # same seed, same weights
        if expected.std() == 0:  # norms, biases
            assert torch.equal(tensor, expected), key
        elif expected.numel() >= 256:  # the same init distribution, parameter by parameter
            assert abs(tensor.std() / expected.std() - 1) < 0.15 and abs(tensor.mean()) < 0.2 * expected.std(), key
            assert not torch.equal(tensor, built["other"].state_dict()[key]), key
    for key, buffer in built["fast"].named_buffers():
        torch.testing.assert_close(buffer, dict(PhiClipMLLM(config).named_buffers())[key], atol=0, rtol=0)  # RoPE
    assert {p.dtype for p in built["bf16"].text_model.parameters()} == {torch.bfloat16}

    model = built["fast"].prime_model("one").train()
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
