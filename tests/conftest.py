"""Shared test fixtures: tiny random CLIP + Phi-3 models and a tiny tokenizer, built in code (no hub)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset import build_word_tokenizer  # noqa: E402
from model import PhiClipConfig, PhiClipMLLM  # noqa: E402
from shapes import make_demo  # noqa: E402

hf_logging.disable_progress_bar()  # keep test logs readable

SHARED_DATA = ROOT.parent / "shared" / "data"
PHI3_TOKENIZER = SHARED_DATA / "phi3_tokenizer"
COCO = SHARED_DATA / "coco"

TINY_CORPUS = [
    "<|user|>\nDescribe this image. <|placeholder1|><|end|>\n<|assistant|>\na red circle<|end|>\n",
    "Can you create a description for this photo? What is shown in this picture?",
    "a red circle",
    "two blue squares",
    "a green triangle on the left",
    "a yellow star",
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "What colour is the shape?",
    "It is blue.",
]

TINY_TEXT = {
    "model_type": "phi3",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
TINY_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
}


def require_shared(path: Path) -> Path:
    """Skip the test when ../shared/data (beside the checkout) is not there, as in a user's clone."""
    if not path.exists():
        pytest.skip(f"{path} not present (shared test data lives beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_word_tokenizer(TINY_CORPUS * 4, vocab_size=320).save_pretrained(directory)
    return directory


def tiny_config(tokenizer_dir: Path | str, **overrides) -> PhiClipConfig:
    values = dict(
        text_model=dict(TINY_TEXT),
        vision_model=dict(TINY_VISION),
        tokenizer=str(tokenizer_dir),
        adapter_dim=48,
        max_length=256,
        attn_implementation="eager",
    )
    values.update(overrides)
    return PhiClipConfig(**values)


@pytest.fixture
def make_model(tiny_tokenizer_dir):
    """Factory: make_model(**config_overrides) -> a fresh tiny PhiClipMLLM with seeded random weights."""

    def make(seed: int = 0, **overrides) -> PhiClipMLLM:
        torch.manual_seed(seed)
        return PhiClipMLLM(tiny_config(tiny_tokenizer_dir, **overrides)).eval()

    return make


def random_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and one stalls whenever the other core is busy
    (`pytestmark = pytest.mark.usefixtures("one_thread")` in the modules that train)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A small shapes demo set: 64 training images, 300 val (10 + 200 conversations), tokenizer/."""
    directory = tmp_path_factory.mktemp("demo")
    make_demo(directory, n=364, conversations=210)
    return directory
