"""The model shipped inside the package: small, loadable, documented, and able to write code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import unmask
from unmask.decoding import GenerationConfig, decode
from unmask.loading import default_model_dir

MAX_BYTES = 64 * 2**20  # the whole directory
MAX_SHARD_BYTES = 15 * 2**20  # each weights file


@pytest.mark.parametrize("name", ["default", "default-ar"])
def test_embedded_model_is_small_and_complete(name: str) -> None:
    directory = default_model_dir(name)
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "tokenizer.json", "MODEL_CARD.md", "training.json"} <= files
    assert "model.safetensors" in files or "model.safetensors.index.json" in files
    assert sum(p.stat().st_size for p in directory.iterdir()) <= MAX_BYTES
    assert all(p.stat().st_size <= MAX_SHARD_BYTES for p in directory.glob("*.safetensors"))


def test_the_default_is_a_coder_with_a_code_vocabulary_and_context_512() -> None:
    loaded = unmask.load(device="cpu")
    assert loaded.model.config.max_seq_len >= 512
    assert 8000 <= loaded.tokenizer.vocab_size <= 16500
    # Code-friendly: a newline with its indentation, and runs of spaces, are single tokens.
    for text in ("\n    ", "\n        ", "        "):
        assert len(loaded.tokenizer.encode(text)) == 1, repr(text)


@pytest.mark.parametrize("name", ["default", "default-ar"])
def test_model_card_reports_the_recorded_training_figures(name: str) -> None:
    directory = default_model_dir(name)
    record = json.loads((directory / "training.json").read_text())
    card = (directory / "MODEL_CARD.md").read_text()
    assert f"{record['tokens_seen']:,}" in card
    assert f"{record['final_validation']['value']:.1f}" in card


def test_embedded_model_writes_mostly_python_tokens_and_beats_chance() -> None:
    loaded = unmask.load(device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    assert model.config.attention == "bidirectional" and model.config.mask_token_id == tok.mask_id
    ids = tok.encode("def add(a, b):\n    return")
    result = decode(model, [ids], GenerationConfig(max_new_tokens=24, steps=24, block_size=8))
    assert result.nfe <= 24 and len(result.sequences[0]) > 0
    # A trained model is far better than uniform at predicting held-out code: the ELBO of a
    # familiar snippet must be well under log(vocab) nats per token.
    from unmask.diffusion.objectives import diffusion_loss

    code = tok.encode("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n")
    x0 = torch.tensor([code] * 32)
    t = torch.linspace(0.05, 0.95, 32)
    with torch.no_grad():
        per_token = diffusion_loss(model, x0, t=t, generator=torch.Generator().manual_seed(0)).loss.item()
    assert per_token < 0.6 * torch.log(torch.tensor(float(tok.vocab_size))).item()


def test_the_ar_twin_is_the_same_model_read_causally_and_beats_chance() -> None:
    twin, diffusion = unmask.load("default-ar", device="cpu"), unmask.load(device="cpu")
    mt, md = twin.model.config, diffusion.model.config
    assert mt.attention == "causal" and mt.shifted and twin.model.num_params() == diffusion.model.num_params()
    assert (mt.d_model, mt.n_layers, mt.n_heads, mt.max_seq_len) == (md.d_model, md.n_layers, md.n_heads, md.max_seq_len)
    assert twin.tokenizer.encode("def fib(n):") == diffusion.tokenizer.encode("def fib(n):")
    code = twin.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n")
    with torch.no_grad():
        logits = twin.model(torch.tensor([code]))[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(code[1:])).item()
    assert nll < 0.6 * torch.log(torch.tensor(float(twin.tokenizer.vocab_size))).item()


def test_generate_on_a_fresh_install_needs_no_model_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unmask", "generate", "def add(a, b):", "--max-new-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "NFE" in proc.stderr
