"""The models shipped inside the package: small, loadable, documented; the default writes code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import unmask
from unmask.decoding import GenerationConfig, decode
from unmask.loading import default_model_dir
from unmask.models.delta import BASE_NAME, DELTA_NAME

MAX_BYTES = 64 * 2**20  # a whole directory
MAX_SHARD_BYTES = 15 * 2**20  # each weights file of a whole model
MAX_DELTA_BYTES = 48 * 2**20  # a delta over an installed base


@pytest.mark.parametrize("name", ["coder-nano-cpu", "coder-nano-cpu-ar"])
def test_the_tiny_pair_is_small_and_complete(name: str) -> None:
    directory = default_model_dir(name)
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "tokenizer.json", "MODEL_CARD.md", "training.json", "model.safetensors"} <= files
    assert sum(p.stat().st_size for p in directory.iterdir()) <= MAX_BYTES
    assert all(p.stat().st_size <= MAX_SHARD_BYTES for p in directory.glob("*.safetensors"))


def test_the_default_is_a_small_delta_over_the_installed_base() -> None:
    directory = default_model_dir("default")
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", BASE_NAME, DELTA_NAME, "tokenizer.json", "MODEL_CARD.md", "training.json", "decoding.json"} <= files
    assert (directory / DELTA_NAME).stat().st_size <= MAX_DELTA_BYTES
    assert json.loads((directory / BASE_NAME).read_text())["base"] == "smollm2-135m"


@pytest.mark.parametrize("name", ["default", "coder-nano-cpu", "coder-nano-cpu-ar"])
def test_model_card_reports_the_recorded_training_figures(name: str) -> None:
    directory = default_model_dir(name)
    record = json.loads((directory / "training.json").read_text())
    card = (directory / "MODEL_CARD.md").read_text()
    assert f"{record['tokens_seen']:,}" in card
    assert f"{record['final_validation']['value']:.1f}" in card


@pytest.fixture(scope="module")
def default(smollm2_gguf):
    return unmask.load(device="cpu")


def test_the_default_is_the_base_adapted_into_block_diffusion(default) -> None:
    base = unmask.load("smollm2-135m", device="cpu")
    c = default.model.config
    assert (c.attention, c.block_size, c.shifted, c.mask_token_id) == ("block", 4, True, 16)
    assert default.tokenizer.mask_id == 16 and default.tokenizer.encode("def f():\n    x") == base.tokenizer.encode("def f():\n    x")
    assert default.tokenizer.chat_template == base.tokenizer.chat_template
    changed = sum(not torch.equal(p, base.model.state_dict()[k]) for k, p in default.model.state_dict().items())
    assert changed > 0 and torch.equal(default.model.embed.weight, base.model.embed.weight)  # the embedding stays


def test_the_default_decodes_the_same_with_its_exact_block_cache(default) -> None:
    ids = default.tokenizer.encode("def add(a, b):\n    return")
    plain = decode(default.model, [ids], GenerationConfig(max_new_tokens=8, block_size=4, stop_at_eos=False))
    cached = decode(default.model, [ids], GenerationConfig(max_new_tokens=8, block_size=4, cache="prefix", stop_at_eos=False))
    assert plain.sequences == cached.sequences and len(plain.sequences[0]) == 8


def test_the_tiny_ar_twin_is_its_sibling_read_causally_and_beats_chance() -> None:
    twin, diffusion = unmask.load("coder-nano-cpu-ar", device="cpu"), unmask.load("coder-nano-cpu", device="cpu")
    mt, md = twin.model.config, diffusion.model.config
    assert mt.attention == "causal" and mt.shifted and twin.model.num_params() == diffusion.model.num_params()
    assert (mt.d_model, mt.n_layers, mt.n_heads, mt.max_seq_len) == (md.d_model, md.n_layers, md.n_heads, md.max_seq_len)
    code = twin.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n")
    with torch.no_grad():
        logits = twin.model(torch.tensor([code]))[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(code[1:])).item()
    assert nll < 0.6 * torch.log(torch.tensor(float(twin.tokenizer.vocab_size))).item()


def test_generate_on_a_fresh_install_needs_no_model_flag() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "unmask", "generate", "def add(a, b):", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "NFE" in proc.stderr
