"""AR decoding with a KV cache, and the decode() dispatch."""

from __future__ import annotations

import pytest
import torch

from unmask.decoding import GenerationConfig, StepEvent, ar_generate, decode, generate
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer


def ar_model(eos: int | None = None, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
               attention="causal", shifted=True, eos_token_id=eos, init_std=0.3)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


def greedy_by_recomputing(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Reference: run the whole sequence again for every new token, no cache, no padding."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([seq]))[0, -1].argmax())
            if token == model.config.eos_token_id:
                break
            seq.append(token)
    return seq[len(prompt):]


PROMPTS = [[2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12]]


def test_cached_greedy_equals_recomputing():
    model = ar_model()
    result = ar_generate(model, PROMPTS, GenerationConfig(max_new_tokens=10))
    assert result.sequences == [greedy_by_recomputing(model, p, 10) for p in PROMPTS]
    assert result.nfe == 10 and result.steps == [10, 10, 10] and result.tokens_per_forward == 1.0


def test_stops_at_eos():
    free = greedy_by_recomputing(ar_model(), PROMPTS[1], 10)
    eos = free[2]
    cut = free.index(eos)
    model = ar_model(eos=eos)
    result = ar_generate(model, [PROMPTS[1]], GenerationConfig(max_new_tokens=10, trace=True))
    assert result.sequences == [free[:cut]] and result.finish_reasons == ["stop"]
    assert result.nfe == cut + 1 and result.trace[-1][0, cut:].tolist() == [eos] * (10 - cut)
    batch = ar_generate(model, [PROMPTS[1], PROMPTS[0]], GenerationConfig(max_new_tokens=10))
    assert batch.sequences[0] == free[:cut] and batch.steps[0] == cut + 1
    assert batch.sequences[1] == greedy_by_recomputing(model, PROMPTS[0], 10)


@pytest.mark.parametrize("sampling", [dict(temperature=0.9, top_k=10), dict(temperature=1.2, top_p=0.9)])
def test_batch_invariance_with_sampling(sampling):
    model = ar_model(eos=3)
    config = GenerationConfig(max_new_tokens=8, **sampling)
    seeds = [3, 4, 5]
    batch = ar_generate(model, PROMPTS, config, seeds=seeds)
    assert min(batch.steps) < max(batch.steps)  # a row stops while the others go on
    for i, prompt in enumerate(PROMPTS):
        alone = ar_generate(model, [prompt], config, seeds=[seeds[i]])
        assert alone.sequences[0] == batch.sequences[i] and alone.steps[0] == batch.steps[i]
        assert alone.finish_reasons[0] == batch.finish_reasons[i]


def test_step_events():
    model = ar_model()
    events: list[StepEvent] = []
    result = ar_generate(model, PROMPTS[:2], GenerationConfig(max_new_tokens=5), on_step=events.append)
    assert [e.nfe for e in events] == [1, 2, 3, 4, 5] and result.nfe == 5
    for i, e in enumerate(events):
        assert e.committed.sum(dim=0).tolist() == [2 if j == i else 0 for j in range(5)]
        assert (e.canvas[:, i + 1 :] == e.mask_id).all()
    assert events[-1].canvas.tolist() == result.sequences and events[-1].done.all()


def test_decode_dispatches_on_attention():
    ar = ar_model()
    config = GenerationConfig(max_new_tokens=6, block_size=3)
    assert decode(ar, PROMPTS, config).sequences == ar_generate(ar, PROMPTS, config).sequences
    torch.manual_seed(0)
    diffusion = Transformer(ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, max_seq_len=48,
                                        mask_token_id=39, init_std=0.3)).eval()
    assert decode(diffusion, PROMPTS, config).sequences == generate(diffusion, PROMPTS, config).sequences


def test_errors():
    with pytest.raises(UnmaskError, match="shifted"):
        ar_generate(ar_model(shifted=False), [[2]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(UnmaskError, match="non-empty"):
        ar_generate(ar_model(), [[]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(UnmaskError, match="max_seq_len"):
        ar_generate(ar_model(), [[2] * 45], GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_joining_and_leaving_a_running_batch_decode_as_they_do_alone(temperature):
    """The engine's AR batch: prompts prefilled at different steps share one cache and one forward per step."""
    from unmask.decoding.ar import ARBatch, ARRow

    model = ar_model()
    config = GenerationConfig(max_new_tokens=10, temperature=temperature)
    prompts = [[2 + i % 30] * (1 + i * 5 % 9) for i in range(24)]  # 1..9 tokens
    batch, rows, widest = ARBatch(model), {}, 0
    for step in range(200):
        if step % 3 == 0 and len(rows) < len(prompts):  # one joins every third step, some leave each step
            i = len(rows)
            rows[i] = batch.add(ARRow(prompts[i], config, torch.Generator().manual_seed(i), []))
        batch.step()
        widest = max(widest, batch.column)
        for row in [r for r in rows.values() if r.done]:
            batch.remove(row)
        if len(rows) == len(prompts) and batch.done:
            break
    for i, prompt in enumerate(prompts):
        alone = ar_generate(model, [prompt], config, seeds=[i]).sequences[0]
        assert rows[i].out == alone
        if temperature == 0:
            assert alone == greedy_by_recomputing(model, prompt, 10)
    assert batch.cache is None and batch.column == 0  # everyone left: nothing is kept
    # ~80 steps ran; the columns no running row uses are dropped, so the cache spans one lifetime or so
    assert widest <= 9 + 10 + 9
