"""Small GPUs: model.quantize (bitsandbytes 8bit / NF4 4bit), 8-bit optimiser states, and the dry run's advice.

The quantised-model tests run wherever bitsandbytes can quantise on the CPU (0.50.2 with torch 2.13 can: NF4 and
LLM.int8 layers forward and backward, and its 8-bit optimisers) and skip with the reason elsewhere; the rest needs
no bitsandbytes at all.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TEXT, TINY_VISION, random_image
from safetensors import safe_open
from test_train import LORA, tiny_config, write
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
)

import bench_lowmem
import dry_run
import quantization
import train
from config import ConfigError, bitsandbytes_installed
from model import IMAGE_TOKEN, PhiClipMLLM
from training_config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = ROOT / "training_configs"
LORA_TEXT = {"r": 8, "lora_alpha": 16, "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
QUANTIZED_CLASSES = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


def require_cpu_quantization(mode: str) -> None:
    """Skip unless bitsandbytes is installed and can quantise `mode` on this CPU."""
    if not bitsandbytes_installed():
        pytest.skip("bitsandbytes is not installed (pip install -e '.[quantize]')")
    try:
        quantization.check_device(mode, torch.device("cpu"))
    except ConfigError as error:
        pytest.skip(str(error))


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.float() - reference.float()).norm() / reference.float().norm()).item()


def quantized_config(demo_dir: Path, out: Path, **training_args) -> dict:
    config = tiny_config(demo_dir, out)
    config["model"]["quantize"] = "4bit"
    config["training_args"].update(training_args)
    return config


# --------------------------------------------------------------------------------------------------- config
def test_the_8gb_configs_are_the_recipe_with_the_memory_switches_on():
    for name, small, phase in (("phi_clip", "phi_clip_8gb", "one"), ("phi_clip_p2", "phi_clip_p2_8gb", "two")):
        recipe = load_config(CONFIGS / f"{name}.yaml", phase=phase, check_paths=False)
        low = load_config(CONFIGS / f"{small}.yaml", phase=phase, check_paths=False)
        assert low["model"]["quantize"] == "4bit" and recipe["model"].get("quantize") is None
        assert low["training_args"]["optim"] == "adamw_8bit" and recipe["training_args"]["optim"] == "adamw_torch"
        assert low["training_args"]["gradient_checkpointing"]
        for key in ("batch_size", "gradient_accumulation_steps", "learning_rate", "num_train_epochs"):
            assert low["training_args"][key] == recipe["training_args"][key], key
        assert (low["peft_text"], low["peft_vision"]) == (recipe["peft_text"], recipe["peft_vision"])
        assert {k: v for k, v in low["model"].items() if k != "quantize"} == recipe["model"]


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("model", "quantize", "3bit", ["model.quantize", "'3bit'", "8bit", "4bit"]),
        ("model", "quantize", True, ["model.quantize", "True"]),
        ("training_args", "optim", "sgd", ["training_args.optim", "'sgd'", "adamw_8bit", "paged_adamw_8bit"]),
    ],
)
def test_bad_quantize_or_optim_is_one_line_error_before_any_model(
    tmp_path, demo_dir, monkeypatch, capsys, section, key, value, expected
):
    monkeypatch.setattr(train, "PhiClipMLLM", None)  # any use of it would fail differently
    config = tiny_config(demo_dir, tmp_path / "out")
    config[section][key] = value
    path = write(tmp_path / "bad.yaml", config)
    assert train.main(["--phase_one", "--config", str(path)]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and str(path) in message
    for fragment in expected:
        assert fragment in message


def test_missing_bitsandbytes_is_one_line_error_and_dry_runs_still_plan(tmp_path, demo_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it raises ImportError
    assert not bitsandbytes_installed()
    monkeypatch.setattr(train, "PhiClipMLLM", None)
    for section, key, value in (("model", "quantize", "8bit"), ("training_args", "optim", "paged_adamw_8bit")):
        config = tiny_config(demo_dir, tmp_path / "out")
        config[section][key] = value
        assert train.main(["--phase_one", "--config", str(write(tmp_path / "c.yaml", config))]) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1, message
        assert f"{section}.{key}={value} needs bitsandbytes" in message and "pip install -e '.[quantize]'" in message
    # Phase two runs a quantised phase-one model quantised again: its stored setting is checked as well.
    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "config.json").write_text(json.dumps({"quantize": "4bit"}))
    two = tiny_config(demo_dir, tmp_path / "p2", **LORA)
    del two["model"]
    two["checkpoint"]["load_dir"] = str(tmp_path / "p1")
    assert train.main(["--config", str(write(tmp_path / "two.yaml", two))]) == 2
    assert "model.quantize=4bit needs bitsandbytes" in capsys.readouterr().err
    # Library use (generate.py, evaluate.py, notebooks) gets the same message when the model is built.
    with pytest.raises(ConfigError, match=r"model.quantize=4bit needs bitsandbytes"):
        PhiClipMLLM(_tiny_model_config(demo_dir, quantize="4bit"))
    # A dry run plans on any machine: it needs neither bitsandbytes nor a GPU.
    assert train.main(["--phase_one", "--dry_run", "--config", str(CONFIGS / "phi_clip_8gb.yaml")]) == 0
    assert "language model 4bit" in capsys.readouterr().out


def _tiny_model_config(demo_dir: Path, **overrides):
    from config import PhiClipConfig

    values = tiny_config(demo_dir, Path("unused"))["model"] | overrides
    return PhiClipConfig.from_dict(values)


def test_a_device_bitsandbytes_cannot_quantise_on_is_one_line_error(monkeypatch, demo_dir):
    require_cpu_quantization("4bit")
    from bitsandbytes import functional

    def unsupported(*args, **kwargs):
        raise NotImplementedError("no kernel for this device\nsecond line")

    monkeypatch.setattr(functional, "quantize_4bit", unsupported)
    with pytest.raises(ConfigError) as raised:
        PhiClipMLLM(_tiny_model_config(demo_dir, quantize="4bit"))
    message = str(raised.value)
    assert "\n" not in message and "cannot quantise on cpu" in message and "no kernel for this device" in message
    assert "model.quantize: null" in message


# ------------------------------------------------------------------------------------------- quantised model
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_lm_keeps_its_logits_close_to_the_unquantized_model(make_model, mode, tmp_path):
    """Tolerance: the logits may be off by twice the weights' own relative rounding error, and no more.

    NF4 rounds Gaussian-like weights with ~9% relative RMS error and LLM.int8 with ~0.7% (plus its 8-bit inputs).
    Each layer's error passes to the logits at about its own relative size (RMSNorm keeps every layer's scale, and
    independent errors add in quadrature): measured 0.07-0.08 (4bit) and 0.0065-0.007 (8bit) for seeds 0-2, against
    weight errors of 0.09 and 0.007. Twice the weight error leaves room for other seeds but fails a path that
    computes something else (a wrong compute dtype, a layer quantised twice, lm_head or CLIP quantised).
    """
    require_cpu_quantization(mode)
    reference, quantized = make_model(seed=1), make_model(seed=1, quantize=mode)
    linears = {n: type(m).__name__ for n, m in quantized.text_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear" and set(linears.values()) == {QUANTIZED_CLASSES[mode]}
    assert {p.dtype for p in [*quantized.vision_model.parameters(), *quantized.vision_adapter.parameters()]} == {
        torch.float32
    }
    assert quantized.parameter_counts()["total"] == reference.parameter_counts()["total"]  # weights, not bytes

    plain = dict(reference.text_model.named_parameters())
    errors = [
        relative_error(quantization.dequantize_weight(module), plain[f"{name}.weight"])
        for name, module in quantized.text_model.named_modules()
        if type(module).__name__ == QUANTIZED_CLASSES[mode]
    ]
    weight_error = sum(errors) / len(errors)
    assert weight_error < {"4bit": 0.12, "8bit": 0.01}[mode]
    batch = reference.processor(
        ["Describe this image. <|placeholder1|>", "What is shown? <|placeholder1|>"], [random_image(0), random_image(1)]
    )
    with torch.no_grad():
        expected, actual = reference(**batch).logits, quantized(**batch).logits
    assert 1e-4 < relative_error(actual, expected) < 2 * weight_error
    quantized.save_pretrained(tmp_path / "saved")  # stores the random LM dequantised, as a checkpoint save does
    with torch.no_grad():  # and leaves the live quantised layers as they were (8-bit lost its scales on the CPU)
        torch.testing.assert_close(quantized(**batch).logits, actual, atol=0, rtol=0)


def test_the_8bit_fp16_cast_is_said_once_not_at_every_matmul(make_model, caplog):
    """bitsandbytes logs the cast at each 8-bit matmul of an fp32 or bf16 model: evaluation, generate.py and chat.py
    printed a line per linear layer per forward (between the words of a streamed reply)."""
    require_cpu_quantization("8bit")
    matmul_logger = logging.getLogger(quantization.INT8_MATMUL_LOGGER)
    for once in list(matmul_logger.filters):  # an earlier test's model has said it already
        matmul_logger.removeFilter(once)
    model = make_model(seed=1, quantize="8bit").eval()
    batch = model.processor(["Describe this image. <|placeholder1|>"], [random_image(0)])
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(3):
            model(**batch)
    casts = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
    assert len(casts) == 1 and "float16" in casts[0].getMessage()


def test_qlora_trains_the_lora_beside_frozen_4bit_weights_as_lora_does_on_the_plain_model(make_model):
    require_cpu_quantization("4bit")
    import bitsandbytes

    batch = make_model().processor(
        ["Describe this image. <|placeholder1|>"] * 2, [random_image(0), random_image(1)], ["a red circle", "hello"]
    )

    def train_lora(quantize: str | None) -> tuple[PhiClipMLLM, list[float], torch.optim.Optimizer]:
        model = make_model(quantize=quantize, adapter_dim=128).setup_lora(LORA_TEXT, LORA["peft_vision"])
        model.enable_gradient_checkpointing()
        optimizer = bitsandbytes.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        losses = []
        for _ in range(16):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return model, losses, optimizer

    model = make_model(quantize="4bit", adapter_dim=128).setup_lora(LORA_TEXT, LORA["peft_vision"])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())  # LoRA and adapter stay fp32
    assert all("lora_" in n or n.startswith("vision_adapter.") for n in trainable)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    assert packed  # the 4-bit weights: two to a byte

    quantized, losses, optimizer = train_lora("4bit")
    _, plain_losses, _ = train_lora(None)
    # The frozen random lm_head bounds the tiny model's logits, so the loss can fall ~1.2 nats from ln(vocab) here.
    assert losses[0] - losses[-1] > 0.8 and plain_losses[0] - plain_losses[-1] > 0.8, (losses, plain_losses)
    assert abs(losses[-1] - plain_losses[-1]) < 0.1, (losses, plain_losses)
    assert any(state["state1"].dtype == torch.uint8 for state in optimizer.state.values())  # 8-bit AdamW states
    parameters = dict(quantized.named_parameters())
    assert all(p.abs().sum() > 0 for n, p in parameters.items() if "lora_B" in n and "text_model" in n)
    for name, weight in packed.items():
        assert torch.equal(parameters[name], weight), name  # the quantised weights never change


def _write_named_backbones(directory: Path, tokenizer_dir: Path) -> dict[str, str]:
    """Tiny random Phi-3 and CLIP saved as hub models would be: named by path, so checkpoints need not store them."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = AutoConfig.for_model(
        **TINY_TEXT, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=end, bos_token_id=None
    )
    vision = CLIPVisionConfig(**{k: v for k, v in TINY_VISION.items() if k != "model_type"})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(text).save_pretrained(directory / "phi3")
    CLIPVisionModel(vision).save_pretrained(directory / "clip")
    return {"text_model": str(directory / "phi3"), "vision_model": str(directory / "clip")}


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples (bitsandbytes nests its optimiser states)."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [tensor for item in items for tensor in _tensors(item)]


def _safetensors(directory: Path) -> dict[str, torch.dtype]:
    dtypes = {}
    for file in directory.rglob("*.safetensors"):
        if any(part.startswith("checkpoint-") for part in file.relative_to(directory).parts):
            continue  # the Trainer's checkpoints hold the same model files as the final directory
        with safe_open(file, "pt") as tensors:
            dtypes.update({f"{file.relative_to(directory)}:{k}": tensors.get_tensor(k).dtype for k in tensors.keys()})  # noqa: SIM118
    return dtypes


def test_quantized_runs_checkpoint_adapter_and_lora_only_and_merge_dequantizes(tmp_path, demo_dir):
    require_cpu_quantization("4bit")
    backbones = _write_named_backbones(tmp_path, demo_dir / "tokenizer")
    steps = {"max_steps": 2, "save_steps": 2, "eval_steps": None, "gradient_checkpointing": True}
    one = quantized_config(demo_dir, tmp_path / "p1", optim="adamw_8bit", **steps)
    one["model"].update(adapter_dim=128, **backbones)
    assert train.main(["--phase_one", "--config", str(write(tmp_path / "one.yaml", one))]) == 0
    # Phase one wrote the adapter (and tokenizer files) only: no backbone weights, quantised or not.
    stored = _safetensors(tmp_path / "p1")
    assert not (tmp_path / "p1" / "text_model").exists() and set(stored) == {
        f"adapter.safetensors:{k}" for k in ("layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias")
    }
    assert json.loads((tmp_path / "p1" / "config.json").read_text())["quantize"] == "4bit"
    states = torch.load(tmp_path / "p1" / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
    assert torch.uint8 in {tensor.dtype for tensor in _tensors(states)}  # 8-bit AdamW states
    reloaded = PhiClipMLLM.from_pretrained(tmp_path / "p1")
    assert any(type(p).__name__ == "Params4bit" for p in reloaded.text_model.parameters())  # quantised again

    two = tiny_config(demo_dir, tmp_path / "p2", **LORA)
    two["model"] = {"quantize": "4bit"}
    two["checkpoint"]["load_dir"] = str(tmp_path / "p1")
    two["training_args"].update(optim="adamw_8bit", **steps)
    assert train.main(["--config", str(write(tmp_path / "two.yaml", two))]) == 0
    stored = _safetensors(tmp_path / "p2")
    assert not (tmp_path / "p2" / "text_model").exists()
    assert {name.split(":")[0] for name in stored} == {
        "adapter.safetensors",
        "lora_text/adapter_model.safetensors",
        "lora_vision/adapter_model.safetensors",
    }
    assert set(stored.values()) == {torch.float32}  # adapter and LoRA, fp32; never a packed 4-bit weight

    model = PhiClipMLLM.from_pretrained(tmp_path / "p2").eval()
    batch = model.processor(["Describe this image. <|placeholder1|>"], [random_image(2)])
    with torch.no_grad():
        quantized_logits = model(**batch).logits
    model.save_pretrained(tmp_path / "merged", merge_lora=True)
    merged_config = json.loads((tmp_path / "merged" / "text_model" / "config.json").read_text())
    assert "quantization_config" not in merged_config
    assert set(_safetensors(tmp_path / "merged" / "text_model").values()) == {torch.float32}  # dequantised
    merged = PhiClipMLLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.quantize is None and not quantization.is_quantized(merged.text_model)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, quantized_logits, atol=2e-5, rtol=0)

    # Merging the QLoRA run's LoRA to start a fresh one trains on quantised again (it dropped to plain weights).
    three = dict(two, checkpoint={"output_dir": str(tmp_path / "p3"), "load_dir": str(tmp_path / "p2")})
    three["checkpoint"]["loaded_lora"] = "merge"
    assert train.main(["--config", str(write(tmp_path / "three.yaml", three))]) == 0
    assert json.loads((tmp_path / "p3" / "config.json").read_text())["quantize"] == "4bit"
    assert set(_safetensors(tmp_path / "p3" / "text_model").values()) == {torch.float32}  # stored merged, plain
    requantized = PhiClipMLLM.from_pretrained(tmp_path / "p3")
    assert quantization.is_quantized(requantized.text_model) and requantized.config.lora_text is not None


def test_text_warmup_trains_the_lm_unquantised_then_phase_one_runs_on_it_quantised(tmp_path, demo_dir, caplog):
    """The demo's recipe with the small-GPU switches (`--demo --set model.quantize=4bit`): 4-bit weights cannot
    train, so the warm-up (the random LM's pre-training) runs first and the LM is quantised after it, as a
    pre-trained Phi-3 is loaded quantised. It died on requires_grad of the 4-bit weights."""
    require_cpu_quantization("4bit")
    config = quantized_config(demo_dir, tmp_path / "p1", max_steps=1, eval_steps=None, gradient_checkpointing=True)
    config["text_warmup"] = {"steps": 2, "batch_size": 8}
    config = load_config(write(tmp_path / "one.yaml", config), phase="one")
    with caplog.at_level(logging.INFO, logger="train"):
        model = train.run_training(config, "one")
    assert "quantize=4bit" in next(r.getMessage() for r in caplog.records if r.getMessage().startswith("model: "))
    assert quantization.is_quantized(model.text_model)
    assert all(layer.gradient_checkpointing for layer in model.text_model.get_decoder().layers)  # the switch, again
    assert json.loads((tmp_path / "p1" / "config.json").read_text())["quantize"] == "4bit"
    assert set(_safetensors(tmp_path / "p1" / "text_model").values()) == {torch.float32}  # the warmed-up LM, plain
    reloaded = PhiClipMLLM.from_pretrained(tmp_path / "p1").eval()
    batch = model.processor([f"Describe this image. {IMAGE_TOKEN}"], [random_image(4)], add_generation_prompt=True)
    with torch.no_grad():  # not closer: NF4's double quantisation does not round-trip through plain weights exactly
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "mode, lora", [("4bit", True), ("4bit", False), ("8bit", True)], ids=["qlora", "phase_one", "8bit_lora"]
)
def test_quantized_models_export_to_llava_as_they_computed_in_training(tmp_path, demo_dir, capsys, mode, lora):
    """The Llava holds the dequantised 4-bit weights (with LoRA merged), so it computes what the quantised model
    computed in training: equal logits up to fp32 summation order (measured 3e-7 at a logit scale of 0.5). LLM.int8
    also rounds the activations, which plain weights cannot: 8-bit agrees to ~1% of the logit scale, no closer."""
    require_cpu_quantization(mode)
    from conftest import tiny_config as model_config
    from test_export import phase_two_checkpoint

    from export import export_llava

    llava_shaped = {"vision_feature_layer": -2, "normalize": False, "quantize": mode}
    if lora:
        checkpoint = phase_two_checkpoint(demo_dir / "tokenizer", tmp_path / "p2", **llava_shaped)
    else:
        model = PhiClipMLLM(model_config(demo_dir / "tokenizer", **llava_shaped)).prime_model("one")
        checkpoint = model.save_pretrained(tmp_path / "p1")
    out = export_llava(checkpoint, tmp_path / "llava", dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())["text_config"]
    trained = PhiClipMLLM.from_pretrained(checkpoint).eval()  # quantised again on load, as in training
    assert quantization.is_quantized(trained.text_model)
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    batch = trained.processor([f"Describe this image. {IMAGE_TOKEN}"], [random_image(3)], add_generation_prompt=True)
    with torch.no_grad():
        expected = trained(**batch).logits
        tolerance = 1e-5 if mode == "4bit" else 3e-2 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(llava(**batch).logits, expected, atol=tolerance, rtol=0)
    assert f"check: the Llava's logits equal the {mode} checkpoint's to" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- dry run
def test_dry_run_counts_4bit_and_8bit_weights_and_8bit_optimizer_states():
    config = load_config(CONFIGS / "phi_clip_8gb.yaml", phase="one", check_paths=False)
    model, about = dry_run.build_meta_model(config, "one")
    assert about["quantize"] == "4bit"
    h, i, layers = 3072, 8192, 32  # Phi-3-mini: the decoder's linear weights; lm_head and embeddings stay bf16
    decoder = layers * (h * 3 * h + h * h + h * 2 * i + i * h)
    plain = dry_run.memory_breakdown(model, 8, 384, True)
    for mode, out_rows in (("4bit", 0), ("8bit", layers * (3 * h + h + 2 * i + h))):
        quantized = dry_run.memory_breakdown(model, 8, 384, True, quantize=mode)
        saved = decoder * (2 - dry_run.QUANTIZED_WEIGHT_BYTES[mode]) - 4 * out_rows  # 8bit: an fp32 scale per row
        assert quantized["weights"] == pytest.approx(plain["weights"] - saved / 1e9, rel=1e-9)
        assert quantized["workspace"] > 0 == plain["workspace"]
    assert 1.8 < decoder * dry_run.QUANTIZED_WEIGHT_BYTES["4bit"] / 1e9 < 1.9  # 3.6 B weights at ~0.52 bytes
    adapter = [1024 * 1024, 1024, 3072 * 1024, 3072]  # weights and biases; biases are under 4096 values
    eight_bit = dry_run.memory_breakdown(model, 8, 384, True, quantize="4bit", optim="adamw_8bit")["optimizer"]
    expected = sum(n * (4 + (2 + 8 / 256 if n >= 4096 else 8)) for n in adapter) / 1e9
    assert eight_bit == pytest.approx(expected, rel=1e-9)
    assert dry_run.memory_breakdown(model, 8, 384, True)["optimizer"] == pytest.approx(12 * sum(adapter) / 1e9)


def _dry_run(capsys, *argv) -> str:
    assert train.main(["--dry_run", *argv]) == 0
    return capsys.readouterr().out


def _configured_gb(out: str) -> float:
    return float(re.search(r"\(configured\): ([\d.]+) GB", out).group(1))


def test_the_8gb_recipe_fits_8gb_by_the_dry_runs_estimate(capsys):
    for argv in (
        ["--phase_one", "--config", str(CONFIGS / "phi_clip_8gb.yaml")],
        ["--config", str(CONFIGS / "phi_clip_p2_8gb.yaml")],
    ):
        out = _dry_run(capsys, *argv, "--gpu_memory_gb", "8")
        assert "(configured)" in out and "fits in 8 GB" in out.split("(configured)")[1].splitlines()[0]
        assert _configured_gb(out) < 7.5 and "to fit in" not in out
        assert "language model 4bit" in out and "optimiser adamw_8bit" in out


def test_dry_run_advice_makes_the_configuration_fit(capsys):
    config = str(CONFIGS / "phi_clip.yaml")
    out = _dry_run(capsys, "--phase_one", "--config", config, "--gpu_memory_gb", "8")
    assert "does NOT fit in 8 GB" in out and "to fit in 8 GB:" in out
    advice = [line for line in out.splitlines() if line.strip().startswith("at batch 8, ")]
    assert advice and any("model.quantize=4bit" in line for line in advice)
    for line in advice:  # each suggested set of switches, applied, fits
        sets = [f"--set={flag}" for flag in re.findall(r"--set (\S+)", line)]
        applied = _dry_run(capsys, "--phase_one", "--config", config, "--gpu_memory_gb", "8", *sets)
        assert "to fit in" not in applied and _configured_gb(applied) == float(re.search(r", ([\d.]+) GB:", line)[1])

    # With every switch already on, the batch shrinks and accumulation grows: the global batch stays 32.
    small = str(CONFIGS / "phi_clip_p2_8gb.yaml")
    out = _dry_run(capsys, "--config", small, "--gpu_memory_gb", "6")
    batch, steps = map(int, re.search(r"batch (\d+) x (\d+) accumulation steps \(global batch 32 kept\)", out).groups())
    assert batch * steps == 32 and batch < 8 and "every memory switch" in out
    sets = [f"--set=training_args.batch_size={batch}", f"--set=training_args.gradient_accumulation_steps={steps}"]
    assert _configured_gb(_dry_run(capsys, "--config", small, "--gpu_memory_gb", "6", *sets)) <= 6
    larger = next(b for b in range(batch + 1, 9) if 32 % b == 0)  # the next batch that keeps the global batch
    sets = [
        f"--set=training_args.batch_size={larger}",
        f"--set=training_args.gradient_accumulation_steps={32 // larger}",
    ]
    assert _configured_gb(_dry_run(capsys, "--config", small, "--gpu_memory_gb", "6", *sets)) > 6

    # When no switch fits the batch, the line with all of them names every flag it assumed: pasted whole, it fits.
    out = _dry_run(capsys, "--config", str(CONFIGS / "phi_clip_p2.yaml"), "--gpu_memory_gb", "6")
    line = next(line for line in out.splitlines() if "with all of them" in line)
    sets = [f"--set={flag}" for flag in re.findall(r"--set (\S+)", line)]
    assert len(sets) > 2
    assert (
        _configured_gb(_dry_run(capsys, "--config", str(CONFIGS / "phi_clip_p2.yaml"), "--gpu_memory_gb", "6", *sets))
        <= 6
    )


# ----------------------------------------------------------------------------------------------- device run
def test_lowmem_bench_runs_end_to_end_at_tiny_size(tmp_path):
    require_cpu_quantization("4bit")
    result = bench_lowmem.run(tiny=True, steps=1, warmup=1, out=tmp_path, say=lambda line: None)
    assert [(r["recipe"], r["phase"]) for r in result["rows"]] == [
        ("8gb", "one"),
        ("8gb", "two"),
        ("bf16", "one"),
        ("bf16", "two"),
    ]
    assert not [r["error"] for r in result["rows"] if "error" in r]
    low = [r for r in result["rows"] if r["recipe"] == "8gb"]
    assert all(r["quantize"] == "4bit" and r["optim"] == "adamw_8bit" and r["checkpointing"] for r in low)
    assert all(r["samples_s"] > 0 and r["estimate_gb"]["total"] > r["estimate_gb"]["allocated"] for r in low)
    assert set(result["summary"]) == {"phase_one", "phase_two"}
    assert json.loads((tmp_path / "lowmem.json").read_text())["rows"] == result["rows"]
    assert "| 8gb | two | phi_clip_p2_8gb.yaml | 8 | 4bit |" in (tmp_path / "lowmem.md").read_text()
