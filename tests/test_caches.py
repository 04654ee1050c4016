"""Block KV caches: exact where they claim to be, and really recomputing less."""

from __future__ import annotations

import random

import pytest
import torch

from unmask.decoding import GenerationConfig, generate, infill
from unmask.decoding.caches import BlockCache
from unmask.decoding.canvas import pad_batch
from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer


def make_model(attention: str = "bidirectional", shifted: bool = False, seed: int = 0, sharpen: float = 50.0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
        attention=attention, block_size=4, shifted=shifted, mask_token_id=1, eos_token_id=0, pad_token_id=2,
    )
    model = Transformer(config).eval()
    with torch.no_grad():  # peaked predictions, so that rounding never reorders near-tied candidates
        model.norm.weight.mul_(sharpen)
    return model


class Counting(torch.nn.Module):
    """Wraps a model and records how many query positions each call ran."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.inner, self.config, self.widths = model, model.config, []

    def forward(self, ids, *args, **kwargs):
        self.widths.append(ids.shape[1])
        return self.inner(ids, *args, **kwargs)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(rng.randint(1, 9))] for _ in range(n)]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("policy", ["confidence", "threshold", "random_count"])
def test_refresh_every_step_equals_no_cache(mode, policy):
    model = make_model()
    base = dict(max_new_tokens=12, block_size=4, policy=policy, threshold=0.3, seed=3)
    plain = generate(model, prompts(3), GenerationConfig(**base))
    cached = generate(model, prompts(3), GenerationConfig(**base, cache=mode, cache_refresh=1))
    assert cached.sequences == plain.sequences and cached.nfe == plain.nfe


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("shifted", [False, True])
def test_a_cached_step_on_an_unchanged_canvas_matches_the_full_pass(mode, shifted):
    """Right after the block's full pass nothing has changed, so the cached logits must equal it."""
    model = make_model(shifted=shifted)
    canvas = pad_batch(prompts(3, seed=1), 12, 1, [[], [], []], 2, torch.device("cpu"))
    span = slice(canvas.start + 4, canvas.start + 8)
    window = slice(span.start - int(shifted), span.stop - int(shifted))
    cache = BlockCache(model, mode)
    with torch.no_grad():
        full = cache(canvas, None, window, span)
        again = cache(canvas, None, window, span)
        reference = model(canvas.ids, canvas.positions, canvas.valid, logits_index=window)
    assert cache.full_passes == 1
    torch.testing.assert_close(full, reference)
    torch.testing.assert_close(again, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("policy", ["confidence", "threshold", "entropy"])
def test_block_causal_cache_is_exact(shifted, policy):
    model = make_model("block", shifted=shifted)
    base = dict(max_new_tokens=13, block_size=4, policy=policy, threshold=0.3)
    plain = generate(model, prompts(4, seed=2), GenerationConfig(**base), seeds=[1, 2, 3, 4])
    counting = Counting(model)
    cached = generate(counting, prompts(4, seed=2), GenerationConfig(**base, cache="dual"), seeds=[1, 2, 3, 4])
    assert cached.sequences == plain.sequences
    width = pad_batch(prompts(4, seed=2), 13, 1, [[]] * 4, 2, torch.device("cpu")).ids.shape[1]
    assert counting.widths[0] <= width and max(counting.widths[1:]) < width  # later steps skip finished blocks


def test_dual_cache_recomputes_only_the_block():
    model = Counting(make_model())
    config = GenerationConfig(max_new_tokens=16, block_size=4, steps=8, cache="dual")
    result = generate(model, [[5, 6, 7]], config)
    width = 3 + 16
    # each block: one full pass, then one step over the block's 4 slots
    assert model.widths == [width, 4] * 4 and result.nfe == 8


def test_prefix_cache_recomputes_the_block_and_the_rest():
    model = Counting(make_model())
    config = GenerationConfig(max_new_tokens=16, block_size=4, steps=8, cache="prefix", cache_refresh=None)
    generate(model, [[5, 6, 7]], config)
    assert model.widths == [19, 16, 19, 12, 19, 8, 19, 4]


def test_refresh_interval_counts_steps():
    model = Counting(make_model())
    config = GenerationConfig(max_new_tokens=8, block_size=8, steps=8, cache="dual", cache_refresh=3)
    generate(model, [[5, 6, 7]], config)
    assert model.widths == [11, 8, 8, 11, 8, 8, 11, 8]


def test_infill_with_caches_keeps_the_suffix():
    model = make_model()
    config = GenerationConfig(max_new_tokens=8, block_size=4, cache="dual")
    out = infill(model, [[5, 6]], [[7, 8, 9]], config)
    plain = infill(model, [[5, 6]], [[7, 8, 9]], GenerationConfig(max_new_tokens=8, block_size=4))
    assert len(out.sequences[0]) <= 8 and out.nfe == plain.nfe


def test_bad_cache_settings():
    from unmask.errors import UnmaskError

    with pytest.raises(UnmaskError, match="unknown cache"):
        GenerationConfig(cache="full")
    with pytest.raises(UnmaskError, match="cache_refresh"):
        GenerationConfig(cache="dual", cache_refresh=0)
