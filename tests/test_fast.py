"""The static-shape fast path: same tokens as the reference decoder, shapes that stay put, no graph breaks."""

from __future__ import annotations

import pytest
import torch

from test_caches import make_model, prompts
from unmask.decoding import GenerationConfig, generate
from unmask.decoding.fast import FastDecoder
from unmask.errors import UnmaskError


def solo_reference(model, rows, config):
    """The reference decoder with the dual cache, one row at a time."""
    return [generate(model, [row], config).sequences[0] for row in rows]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize(
    "settings",
    [
        dict(policy="confidence", steps=8),
        dict(policy="confidence", steps=16, block_size=8),
        dict(policy="threshold", threshold=0.7),
        dict(policy="threshold", threshold=0.9, cache_refresh=2),
        dict(policy="confidence", steps=6, block_size=None),
    ],
)
def test_fast_batch_equals_reference_solo(shifted, settings):
    model = make_model(shifted=shifted)
    config = GenerationConfig(**{"max_new_tokens": 16, "block_size": 4, "cache": "dual", **settings})
    rows = prompts(5, seed=4)
    fast = FastDecoder(model).generate(rows, config)
    assert fast.sequences == solo_reference(model, rows, config)


def test_early_stop_at_eos_matches_the_reference():
    model = make_model()
    eos = model.config.eos_token_id
    with torch.no_grad():  # lift EOS so that it wins at about a fifth of the positions
        logits = model(torch.tensor(prompts(6, seed=5)[0] + [model.config.mask_token_id] * 16)[None])[0]
        gap = logits.max(-1).values - logits[:, eos]
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = float(torch.quantile(gap, 0.2))
    model.head.bias = torch.nn.Parameter(bias)
    config = GenerationConfig(max_new_tokens=16, block_size=4, steps=16, cache="dual")  # EOS commits alone
    rows = prompts(6, seed=5)
    fast = FastDecoder(model).generate(rows, config)
    reference = [generate(model, [row], config) for row in rows]
    assert fast.sequences == [r.sequences[0] for r in reference]
    assert fast.finish_reasons == [r.finish_reasons[0] for r in reference]
    assert fast.steps == [r.steps[0] for r in reference]
    assert "stop" in fast.finish_reasons and any(len(s) < 16 for s in fast.sequences)


def test_prompts_of_different_lengths_share_bucketed_shapes():
    model = make_model()
    decoder = FastDecoder(model, bucket=64)
    config = GenerationConfig(max_new_tokens=16, block_size=4, steps=8, cache="dual")
    for length in (1, 3, 9, 20):
        decoder.generate([[5] * length], config)
    assert decoder.shapes == {("full", 1, 64), ("block", 1, 4)}


def test_passes_trace_as_whole_graphs():
    """No graph breaks (no host reads, no data-dependent Python) in the passes CUDA graphs capture."""
    model = make_model(shifted=True)
    traced = FastDecoder(model, compile=True, backend="eager")
    config = GenerationConfig(max_new_tokens=12, block_size=4, steps=6, cache="dual")
    rows = prompts(3, seed=6)
    assert traced.generate(rows, config).sequences == FastDecoder(model).generate(rows, config).sequences


def test_sampling_is_seeded_per_row():
    model = make_model()
    config = GenerationConfig(max_new_tokens=12, block_size=4, steps=6, cache="dual", temperature=1.0)
    rows = prompts(3, seed=7)
    decoder = FastDecoder(model)
    batch = decoder.generate(rows, config, seeds=[1, 2, 3])
    assert batch.sequences == decoder.generate(rows, config, seeds=[1, 2, 3]).sequences
    assert decoder.generate(rows[1:2], config, seeds=[2]).sequences[0] == batch.sequences[1]
    assert decoder.generate(rows, config, seeds=[4, 5, 6]).sequences != batch.sequences


def test_unsupported_settings_are_named():
    with pytest.raises(UnmaskError, match="policies"):
        FastDecoder(make_model()).generate([[5]], GenerationConfig(max_new_tokens=4, policy="entropy"))
    with pytest.raises(UnmaskError, match="bidirectional"):
        FastDecoder(make_model("block")).generate([[5]], GenerationConfig(max_new_tokens=4, block_size=4))


class Recording(torch.nn.Module):
    """Wraps a model and keeps the last-position logits of every call."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner, self.config, self.logits = model, model.config, []

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.logits.append(out[:, -1].clone())
        return out


def test_fast_ar_equals_ar_generate_and_reuses_its_cache_cleanly():
    from unmask.decoding import ar_generate
    from unmask.decoding.fast import FastARDecoder

    model = make_model("causal", shifted=True)
    config = GenerationConfig(max_new_tokens=12)
    recording = Recording(model)
    decoder = FastARDecoder(recording, bucket=32)
    padded, unpadded = [[5], list(range(5, 14))], [list(range(5, 14)), [5]]
    # A later call must not see an earlier call's slots: row 0 is first padded by 8 slots, then not at all.
    for rows in (prompts(3, seed=8), padded, unpadded):
        recording.logits.clear()
        out = decoder.generate(rows, config).sequences
        assert out == ar_generate(model, rows, config).sequences
        # every step's logits equal a plain pass over the whole row so far, no cache, no padding
        for r, (prompt, generated) in enumerate(zip(rows, out)):
            full = model(torch.tensor([prompt + generated]))[0]
            for i, step_logits in enumerate(recording.logits[: len(generated)]):
                torch.testing.assert_close(step_logits[r], full[len(prompt) - 1 + i], atol=1e-4, rtol=1e-4)
    traced = FastARDecoder(model, compile=True, backend="eager")
    assert traced.generate(unpadded, config).sequences == ar_generate(model, unpadded, config).sequences
