"""bench.py keeps working: its measurement functions at a tiny size (seconds; no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import COCO, require_shared
from torch.utils._python_dispatch import TorchDispatchMode

import bench


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return bench.build_pair(bench.TINY_TEXT, bench.TINY_VISION, tmp_path_factory.mktemp("bench"))


def test_cpu_config_keeps_the_real_flop_split():
    real = bench.split(bench.flops(bench.REAL_TEXT, bench.REAL_VISION, 33, 257))
    assert 4400 < real["total_gflop"] < 4800  # ~4.6 TFLOP per phase-one sample
    scaled = bench.split(bench.flops(bench.CPU_TEXT, bench.CPU_VISION, 34, 256))
    for part in ("lm_layers", "vision", "lm_head"):
        assert 0.5 < scaled[part] / real[part] < 2, part
    assert scaled["lm_head"] < 5  # lm_head must not dominate: that would flatter supervised-only logits


def test_pair_computes_the_same_function_and_trains_the_same_set(pair):
    ours, peer = pair
    batch = bench.make_batch(ours, 3)
    with torch.no_grad():
        losses = [m.eval()(**batch).loss for m in (ours, peer)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-4, rtol=0)
    assert bench.set_phase(ours, peer, "one") == sum(p.numel() for p in ours.vision_adapter.parameters())
    lora = bench.lora_settings(bench.TINY_TEXT, bench.TINY_VISION)
    trainable = bench.set_phase(ours, peer, "two", lora)  # asserts both sets are the same size
    for model in (ours, peer):
        tower = ours.vision_model if model is ours else peer.model.vision_tower
        lora_b, got_gradient = [p for n, p in tower.named_parameters() if "lora_B" in n], []
        for parameter in lora_b:
            parameter.register_post_accumulate_grad_hook(got_gradient.append)
        bench.make_step(model, batch)[0]()
        assert lora_b and len(got_gradient) == len(lora_b)  # ViT LoRA trains
    with bench.lever(ours, peer, "ours", "two", attn=bench.PLAIN), torch.no_grad():
        plain = ours.eval()(**batch).loss
    with torch.no_grad():
        torch.testing.assert_close(plain, ours(**batch).loss, atol=0, rtol=0)
    bench.unset_lora(ours, peer)
    assert trainable > sum(p.numel() for p in ours.vision_adapter.parameters())


def test_checkpointing_lever_switches_on_and_leaves_nothing_on(pair):
    ours, peer = pair
    bench.set_phase(ours, peer, "two", bench.lora_settings(bench.TINY_TEXT, bench.TINY_VISION))
    for who in ("ours", "peer"):
        with bench.lever(ours, peer, who, "two", checkpointing=True) as model:
            assert bench.checkpointed_modules(model)
        assert not bench.checkpointed_modules(ours) and not bench.checkpointed_modules(peer)
    bench.unset_lora(ours, peer)


def test_bench_train_reports_times_and_memory(pair):
    ours, peer = pair
    bench.set_phase(ours, peer, "one")
    result = bench.bench_train(ours, peer, bench.make_batch(ours, 2), "one", repeats=1)
    for name in ("ours", "ours+plain_sdpa", "peer"):
        assert result[name]["median_s"] > 0 and result[name]["peak_mb"] > result[name]["resting_mb"] > 0
    assert result["ours"]["peak_mb"] < result["ours+plain_sdpa"]["peak_mb"]  # the fused-qkv view no longer pinned
    assert result["ours_time_ratio"] > 0 and result["ours_memory_ratio"] > 0


def test_bench_generate_produces_the_same_text(pair):
    ours, peer = pair
    result = bench.bench_generate(ours, peer, batch_sizes=(1, 2), new_tokens=4, repeats=1)
    assert result["batch_2"]["same_text"] and result["batch_1"]["ours_tokens_s"] > 0
    assert ours.text_model.generation_config.min_new_tokens is None  # restored


def test_bench_data_on_coco(pair):
    require_shared(COCO)
    result = bench.bench_data(pair[0].processor, workers=(0,), samples=8, batch_size=4, repeats=1)
    assert result["images"] > 0 and result["workers_0_samples_s"] > 0


def test_gpu_path_runs_every_row_tiny_on_any_device(tmp_path, capsys):
    bench.main(["--gpu", "--tiny", "--out", str(tmp_path / "gpu.json")])
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert not [row for row in result["rows"] if "error" in row]
    for skipped in result["skipped"]:  # tiny skips only train.py's compiled rows, and liger without a GPU
        assert "tiny (inductor's compile" in skipped or "liger-kernel needs a CUDA GPU" in skipped, skipped
    rows = {(r["model"], r["phase"], r["compile"], r["interleaved"], r["checkpointing"]) for r in result["rows"]}
    for phase in ("one", "two"):
        for compiled in (False, True):  # ours and the peer interleaved, eager and compiled (LoRA inside in two)
            assert {("ours", phase, compiled, True, False), ("peer", phase, compiled, True, False)} <= rows
        assert {("ours", phase, False, False, True), ("peer", phase, False, False, True)} <= rows  # checkpointing
    trainer = result["train_py"][0]  # train.py itself beside the bench step on its model and data
    assert not trainer["torch_compile"] and not trainer["use_liger_kernel"]
    assert trainer["train_py_samples_s"] > 0 and trainer["bench_step_samples_s"] > 0
    assert "phase two compiled: ours / peer" in (tmp_path / "gpu.txt").read_text()
    assert "samples/s" in capsys.readouterr().out


class MatmulDtypes(TorchDispatchMode):
    """Records the dtypes of the linear layers' matrix products (forward and backward). Not bmm: transformers 5.17
    computes RoPE angles with an fp32 bmm on purpose (autocast off), as it should."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.seen.add(args[-1].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_step_is_trainers_mixed_precision_with_bf16_matmuls_and_fp32_master_weights(tmp_path):
    # train.py's Trainer (bf16=True) autocasts through accelerate; a step without it ran the fp32 adapter and LoRA
    # weights as fp32 matmuls (issue 12's sm80 fp32 GEMMs). The bench's step must be the same step.
    ours, peer = bench.build_pair(bench.TINY_TEXT, bench.TINY_VISION, tmp_path, dtype=torch.bfloat16)
    batch = bench.make_batch(ours, 2)
    for phase in ("one", "two"):
        bench.set_phase(ours, peer, phase, bench.lora_settings(bench.TINY_TEXT, bench.TINY_VISION))
        for model in (peer, ours):
            step, optimizer = bench.make_step(model, batch)
            with MatmulDtypes() as matmuls:
                step()
            assert matmuls.seen == {torch.bfloat16}, (phase, type(model).__name__)
        trainable = [p for p in ours.parameters() if p.requires_grad]  # ours' master weights and AdamW state: fp32
        assert (
            {p.dtype for p in trainable} == {optimizer.state[p]["exp_avg"].dtype for p in trainable} == {torch.float32}
        )
    bench.unset_lora(ours, peer)
