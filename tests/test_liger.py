"""training_args.use_liger_kernel: liger-kernel's fused RMSNorm, SwiGLU and RoPE in the language model.

liger's kernels are Triton GPU kernels with no CPU path, so on the CPU only the errors are tested. On a CUDA machine
with liger-kernel installed (the device run in BENCHMARKS.md) the fused model's loss and gradients are compared with
the unfused model's; bench.py --gpu measures train.py with and without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image
from test_model import ANSWERS, PROMPTS
from test_train import tiny_config, write

import train
import training_config
from backbones import use_liger_kernels
from shapes import make_demo

LIGER_INSTALLED = training_config.installed("liger_kernel")
# LoRA on the linear layers around every fused kernel, so each sits on a gradient path; random B (not zeros), so
# every LoRA weight has a gradient at the first step.
TEXT_LORA = {"r": 4, "target_modules": ["qkv_proj", "gate_up_proj", "down_proj"], "init_lora_weights": False}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("demo")
    make_demo(directory, n=364, conversations=210)
    return directory


def liger_config(demo_dir: Path, out: Path) -> dict:
    config = tiny_config(demo_dir, out)
    config["training_args"]["use_liger_kernel"] = True
    return config


def test_missing_liger_is_one_line_error_naming_the_key(tmp_path, demo_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setattr(train, "PhiClipMLLM", None)  # the config is refused before any model is built
    path = write(tmp_path / "liger.yaml", liger_config(demo_dir, tmp_path / "out"))
    assert train.main(["--phase_one", "--config", str(path)]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1, message
    assert str(path) in message and "training_args.use_liger_kernel=true needs liger-kernel" in message
    assert "pip install -e '.[liger]'" in message
    # A dry run plans on any machine, with or without liger.
    assert train.main(["--phase_one", "--dry_run", "--config", str(path)]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_liger_without_a_gpu_is_one_line_error(tmp_path, demo_dir, monkeypatch, capsys):
    monkeypatch.setattr(training_config, "installed", lambda module: True)  # past the install check, with or without it
    path = write(tmp_path / "liger.yaml", liger_config(demo_dir, tmp_path / "out"))
    assert train.main(["--phase_one", "--config", str(path)]) == 2
    message = capsys.readouterr().err
    expected = "training_args.use_liger_kernel=true: liger-kernel's Triton kernels need a CUDA GPU"
    assert message == f"error: {path}: {expected}\n"  # the YAML file it is in, as every config error


@pytest.mark.skipif(not (torch.cuda.is_available() and LIGER_INSTALLED), reason="needs a CUDA GPU and liger-kernel")
@pytest.mark.parametrize(
    "dtype, tolerance, compiled",
    [(torch.float32, 1e-4, False), (torch.bfloat16, 2e-2, False), (torch.float32, 1e-4, True)],
    ids=["fp32", "bf16", "fp32-compiled"],
)
def test_liger_matches_the_unfused_model_in_loss_and_gradients(make_model, monkeypatch, dtype, tolerance, compiled):
    """The tolerance is relative: fp32 leaves only the kernels' different summation order (1e-4 is ~100x that);
    bf16 rounds RMSNorm's and SwiGLU's outputs at different points (2e-2 is a few bf16 epsilons). Compiled: the
    decoder layers as training_args.torch_compile compiles them, traced by dynamo and AOTAutograd with liger inside."""
    from transformers.models.phi3 import modeling_phi3

    model = make_model(seed=0).setup_lora(TEXT_LORA, None).to("cuda", dtype).train()
    model.vision_adapter.float()
    batch = model.processor(PROMPTS, [random_image(i) for i in range(3)], ANSWERS)
    batch = {k: v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda") for k, v in batch.items()}

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}

    unfused_loss, unfused_gradients = loss_and_gradients()
    for name in ("apply_rotary_pos_emb", "Phi3RMSNorm", "Phi3MLP"):  # liger patches the module: restore it after
        monkeypatch.setattr(modeling_phi3, name, getattr(modeling_phi3, name))
    unfused_norm = modeling_phi3.Phi3RMSNorm.forward
    use_liger_kernels(model.text_model)
    layer = model.text_model.get_base_model().model.layers[0]
    assert layer.input_layernorm.forward.__func__ is not unfused_norm, "liger did not patch the RMSNorm"
    assert "liger" in modeling_phi3.apply_rotary_pos_emb.__module__
    if compiled:
        torch._dynamo.reset()
        model.compile_language_model(backend="aot_eager")
    fused_loss, fused_gradients = loss_and_gradients()

    assert abs(fused_loss - unfused_loss) <= tolerance * unfused_loss
    assert fused_gradients.keys() == unfused_gradients.keys() and any("lora_" in n for n in fused_gradients)
    for name, gradient in fused_gradients.items():
        reference = unfused_gradients[name]
        error = ((gradient - reference).norm() / reference.norm()).item()
        assert error <= tolerance, f"{name}: relative gradient error {error:.2e}"
