"""The diffusion decoding loop: exactness on a known distribution, batch invariance, blocks, infill."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare
from torch import nn

from unmask.decoding import GenerationConfig, StepEvent, generate, infill
from unmask.decoding.step import block_bounds, block_budgets, spread
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer

# ---------------------------------------------------------------------------- test models


class OracleModel(nn.Module):
    """Logits are the exact conditionals p(x_i | revealed tokens) of a known joint distribution.

    The joint is over sequences of length ``L`` with values 0..K-1; id K is ``[MASK]``, which gets a
    large logit so that a decoder forgetting to exclude it would write masks. ``marginal_only``
    ignores what is revealed (the unconditional marginals: a deliberately wrong model).
    """

    def __init__(self, joint: torch.Tensor, k: int, shifted: bool = False, marginal_only: bool = False) -> None:
        super().__init__()
        length = joint.dim()
        self.config = ModelConfig(
            vocab_size=k + 1, d_model=8, n_layers=1, n_heads=1, max_seq_len=length, mask_token_id=k, shifted=shifted
        )
        self.k, self.length, self.marginal_only = k, length, marginal_only
        seqs = torch.tensor(list(itertools.product(range(k), repeat=length)))
        self.register_buffer("seqs", seqs)
        self.register_buffer("probs", joint.flatten().double())
        self.calls = 0

    def forward(self, ids, positions=None, valid=None, cache=None, cache_start=None, logits_index=None, attn_mask=None):
        assert ids.shape[1] == self.length and valid is None, "the oracle takes unpadded full sequences"
        self.calls += 1
        mask = self.k
        consistent = ((ids[:, None, :] == mask) | (ids[:, None, :] == self.seqs[None])).all(-1)
        weights = self.probs.expand(ids.shape[0], -1) if self.marginal_only else consistent * self.probs
        onehot = nn.functional.one_hot(self.seqs, self.k).double()  # [S, L, K]
        marg = torch.einsum("bs,slk->blk", weights, onehot)
        cond = (marg / marg.sum(-1, keepdim=True)).log().float()
        logits = torch.cat([cond, torch.full_like(cond[..., :1], 10.0)], dim=-1)
        if self.config.shifted:
            logits = torch.cat([logits[:, 1:], torch.zeros_like(logits[:, :1])], dim=1)
        return logits if logits_index is None else logits[:, logits_index]


class PositionModel(nn.Module):
    """Predicts ``target(p)`` at absolute position p with logit ``strength(p)`` (0 for the rest)."""

    def __init__(self, target, strength=lambda p: 8.0, vocab=12, shifted=False, eos=None, max_len=64) -> None:
        super().__init__()
        self.config = ModelConfig(
            vocab_size=vocab, d_model=8, n_layers=1, n_heads=1, max_seq_len=max_len,
            mask_token_id=vocab - 1, eos_token_id=eos, shifted=shifted,
        )
        self.target, self.strength = target, strength
        self.inputs: list[torch.Tensor] = []

    def forward(self, ids, positions=None, valid=None, cache=None, cache_start=None, logits_index=None, attn_mask=None):
        self.inputs.append(ids.clone())
        if positions is None:
            positions = torch.arange(ids.shape[1]).expand_as(ids)
        predicted = positions + 1 if self.config.shifted else positions
        logits = torch.zeros(*ids.shape, self.config.vocab_size)
        for (b, i), p in zip(itertools.product(range(ids.shape[0]), range(ids.shape[1])), predicted.flatten().tolist()):
            logits[b, i, self.target(p)] = self.strength(p)
        return logits if logits_index is None else logits[:, logits_index]


def tiny_transformer(attention: str = "bidirectional", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=2, max_seq_len=48, mask_token_id=39,
               eos_token_id=1, attention=attention, block_size=4, init_std=0.3)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).eval()


# ---------------------------------------------------------------------------- exactness


K, L = 3, 4  # values per position, sequence length (position 0 is the prompt)


def known_joint() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    logits = 1.2 * torch.randn(K**L, generator=g, dtype=torch.float64)
    return torch.softmax(logits, 0).view(*[K] * L)


def chi_square_pvalue(model: OracleModel, config: GenerationConfig, n: int = 3000) -> float:
    """Sample n answers to the prompt [0] and test them against p(x1, x2, x3 | x0 = 0)."""
    target = known_joint()[0].flatten()
    target = target / target.sum()
    result = generate(model, [[0]] * n, config, seeds=list(range(n)))
    counts = torch.zeros(K ** (L - 1), dtype=torch.float64)
    for seq in result.sequences:
        assert len(seq) == L - 1 and all(0 <= t < K for t in seq)
        counts[int(sum(t * K ** (L - 2 - i) for i, t in enumerate(seq)))] += 1
    return float(chisquare(counts.numpy(), (target * n).numpy()).pvalue)


@pytest.mark.parametrize("shifted", [False, True])
def test_random_policy_samples_the_exact_joint(shifted):
    model = OracleModel(known_joint(), K, shifted=shifted)
    config = GenerationConfig(max_new_tokens=L - 1, block_size=None, policy="random", temperature=1.0, stop_at_eos=False)
    assert chi_square_pvalue(model, config) > 1e-3
    assert model.calls == L - 1  # one token per step, all rows in lockstep


@pytest.mark.parametrize(
    "case",
    ["marginal model", "all at once", "left-to-right argmax"],
)
def test_chi_square_rejects_wrong_samplers(case):
    model = OracleModel(known_joint(), K, marginal_only=case == "marginal model")
    config = GenerationConfig(max_new_tokens=L - 1, block_size=None, policy="random", temperature=1.0, stop_at_eos=False)
    if case == "all at once":  # reveals every token from its marginal: a product distribution
        config.steps = 1
    if case == "left-to-right argmax":
        config.block_size, config.temperature, config.policy = 1, 0.0, "confidence"
    assert chi_square_pvalue(model, config) < 1e-6


# ---------------------------------------------------------------------------- schedule


def test_schedule_helpers():
    assert spread(7, 3) == [3, 2, 2] and spread(4, 4) == [1, 1, 1, 1]
    assert block_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_bounds(10, 4, offset=5) == [(0, 3), (3, 7), (7, 10)]
    assert block_bounds(8, 4, offset=8) == [(0, 4), (4, 8)]
    assert block_budgets([(0, 4), (4, 8)], 8, 4) == [2, 2]
    assert sum(block_budgets(block_bounds(12, 5), 12, 7)) == 7
    assert block_budgets([(0, 4)], 4, None) == [4]


def commits_per_step(model, prompt, config) -> list[int]:
    events: list[StepEvent] = []
    generate(model, [prompt], config, on_step=events.append)
    return [int(e.committed.sum()) for e in events]


@pytest.mark.parametrize("n,block,steps,expected", [(12, 4, 6, [2] * 6), (10, 5, 4, [3, 2, 3, 2]), (6, None, 2, [3, 3])])
def test_quota_policies_follow_the_step_schedule(n, block, steps, expected):
    model = tiny_transformer(eos_token_id=None)
    for policy in ("confidence", "margin", "entropy", "random_count"):
        config = GenerationConfig(max_new_tokens=n, block_size=block, steps=steps, policy=policy)
        assert commits_per_step(model, [3, 4, 5], config) == expected


def test_threshold_extremes():
    model = tiny_transformer(eos_token_id=None, init_std=0.02)

    def config(n: int, tau: float, steps: int | None = None) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=n, block_size=4, steps=steps, policy="threshold", threshold=tau)

    one = generate(model, [[3, 4]], config(8, 1.0))
    assert one.nfe == 8 and one.steps == [8]
    assert commits_per_step(model, [3, 4], config(8, 1.0)) == [1] * 8
    zero = generate(model, [[3, 4]], config(12, 0.0))
    assert zero.nfe == 3 and len(zero.sequences[0]) == 12  # one step per block
    assert generate(model, [[3, 4]], config(8, 1.0, steps=4)).nfe == 4  # steps is a cap for adaptive policies


def first_open_block_only(events: list[StepEvent], row: int, bounds, mask_id: int, n: int) -> None:
    """Every step writes only inside the first block that still had masks before it."""
    before = torch.full((n,), mask_id)
    for e in events:
        open_block = next((s, t) for s, t in bounds if bool((before[s:t] == mask_id).any()))
        written = e.committed[row].nonzero().flatten()
        assert written.numel() > 0 or e.done[row]
        assert all(open_block[0] <= int(i) < open_block[1] for i in written)
        before = e.canvas[row]


@pytest.mark.parametrize("policy", ["confidence", "threshold", "random", "factor"])
def test_semi_autoregressive_blocks(policy):
    model = tiny_transformer(eos_token_id=None)
    events: list[StepEvent] = []
    config = GenerationConfig(max_new_tokens=12, block_size=4, steps=6, policy=policy, temperature=0.7, seed=1)
    generate(model, [[3, 4, 5]], config, on_step=events.append)
    first_open_block_only(events, 0, block_bounds(12, 4), 39, 12)


def test_block_causal_blocks_are_aligned_to_absolute_positions():
    model = tiny_transformer("block", eos_token_id=None)
    prompts = [[3, 4, 5, 6, 7], [3, 4, 5, 6, 7, 8], [3, 4, 5, 6]]
    events: list[StepEvent] = []
    config = GenerationConfig(max_new_tokens=9, block_size=4, policy="confidence")
    batch = generate(model, prompts, config, on_step=events.append)
    for r, p in enumerate(prompts):
        first_open_block_only(events, r, block_bounds(9, 4, offset=len(p)), 39, 9)
        assert generate(model, [p], config).sequences[0] == batch.sequences[r]
    with pytest.raises(UnmaskError, match="block_size 4"):
        generate(model, [[3]], GenerationConfig(max_new_tokens=8, block_size=8))


# ---------------------------------------------------------------------------- batching


POLICY_CASES = ["random", "random_count", "confidence", "margin", "entropy", "threshold", "factor"]
SAMPLING_CASES = [dict(temperature=0.0), dict(temperature=0.8, top_k=12), dict(temperature=1.3, top_p=0.9)]


def assert_batch_invariant(run, inputs: list, seeds: list[int]) -> None:
    batch = run(inputs, seeds)
    for i, item in enumerate(inputs):
        alone = run([item], [seeds[i]])
        assert alone.sequences[0] == batch.sequences[i], f"row {i}"
        assert alone.finish_reasons[0] == batch.finish_reasons[i]
        assert alone.steps[0] == batch.steps[i]


@pytest.mark.parametrize("sampling", SAMPLING_CASES, ids=["greedy", "top_k", "top_p"])
@pytest.mark.parametrize("policy", POLICY_CASES)
def test_batch_invariance(policy, sampling):
    model = tiny_transformer()
    config = GenerationConfig(max_new_tokens=8, block_size=4, steps=4, policy=policy, threshold=0.5, **sampling)
    prompts = [[2, 3, 4], [5, 6, 7, 8, 9, 10, 11], [12], [2, 3, 4]]
    assert_batch_invariant(lambda p, s: generate(model, p, config, seeds=s), prompts, [11, 12, 13, 14])


def test_seed_from_config_and_different_seeds_differ():
    model = tiny_transformer(eos_token_id=None)
    config = GenerationConfig(max_new_tokens=12, block_size=None, policy="random", temperature=1.0, seed=5)
    a = generate(model, [[2, 3], [2, 3]], config).sequences
    assert a[0] == a[1] == generate(model, [[2, 3]], config).sequences[0]
    b = generate(model, [[2, 3], [2, 3]], config, seeds=[1, 2]).sequences
    assert b[0] != b[1]


# ---------------------------------------------------------------------------- shifted, early stop


@pytest.mark.parametrize("shifted", [False, True])
def test_predictions_come_from_the_right_position(shifted):
    model = PositionModel(lambda p: 2 + p % 7, shifted=shifted)
    prompts = [[3, 3, 3], [4], [5, 5, 5, 5, 5]]
    result = generate(model, prompts, GenerationConfig(max_new_tokens=6, block_size=3, policy="confidence"))
    for prompt, seq in zip(prompts, result.sequences):
        assert seq == [2 + (len(prompt) + j) % 7 for j in range(6)]


def test_early_stop_at_eos():
    # Positions < 5 hold token 5 (very confident), later ones EOS (less confident).
    model = PositionModel(lambda p: 5 if p < 5 else 1, strength=lambda p: 9.0 if p < 5 else 5.0, eos=1)
    config = GenerationConfig(max_new_tokens=16, block_size=None, policy="confidence", trace=True)
    stopped = generate(model, [[3, 3]], config)
    assert stopped.sequences == [[5, 5, 5]] and stopped.finish_reasons == ["stop"]
    assert stopped.nfe == 4 and stopped.steps == [4]
    assert stopped.trace[-1][0].tolist() == [5, 5, 5] + [1] * 13
    config.stop_at_eos = False
    full = generate(model, [[3, 3]], config)
    assert full.sequences == [[5, 5, 5]] and full.finish_reasons == ["length"] and full.nfe == 16


def test_no_early_stop_while_earlier_positions_are_masked():
    # EOS (positions >= 5) is now the most confident prediction, so it is committed first.
    model = PositionModel(lambda p: 5 if p < 5 else 1, strength=lambda p: 5.0 if p < 5 else 9.0, eos=1)
    events: list[StepEvent] = []
    config = GenerationConfig(max_new_tokens=16, block_size=None, policy="confidence")
    result = generate(model, [[3, 3]], config, on_step=events.append)
    assert events[0].committed[0].nonzero().flatten().tolist() == [3]
    assert result.sequences == [[5, 5, 5]] and result.finish_reasons == ["stop"] and result.nfe == 16


def test_finished_rows_stop_taking_steps_in_a_batch():
    model = PositionModel(lambda p: 5 if p < 5 else 1, strength=lambda p: 9.0 if p < 5 else 5.0, eos=1)
    result = generate(model, [[3, 3], [3]], GenerationConfig(max_new_tokens=16, block_size=None, policy="confidence"))
    assert result.steps == [4, 5] and result.nfe == 5
    assert result.tokens_per_forward == pytest.approx((3 + 4) / (4 + 5))


# ---------------------------------------------------------------------------- infill


def test_infill_writes_only_the_middle():
    inner = tiny_transformer(eos_token_id=None)
    calls: list[torch.Tensor] = []

    class Spy(nn.Module):
        config = inner.config

        def forward(self, ids, *args, **kwargs):
            calls.append(ids.clone())
            return inner(ids, *args, **kwargs)

    prefix, suffix, n = [2, 3, 4], [5, 6], 6
    result = infill(Spy(), [prefix], [suffix], GenerationConfig(max_new_tokens=n, block_size=None, policy="confidence"))
    middle = result.sequences[0]
    assert len(middle) == n and len(calls) == n
    for ids in calls:
        row = ids[0].tolist()
        assert row[:3] == prefix and row[-2:] == suffix
        assert all(t in (39, m) for t, m in zip(row[3:-2], middle))


def test_infill_variable_length_and_batching():
    # Middle positions >= 6 are predicted as EOS: the middle ends there and is trimmed.
    model = PositionModel(lambda p: 4 if p < 6 else 1, eos=1)
    result = infill(model, [[2, 2, 2]], [[7, 7]], GenerationConfig(max_new_tokens=8, block_size=4, policy="confidence"))
    assert result.sequences == [[4, 4, 4]] and result.finish_reasons == ["stop"]
    transformer = tiny_transformer()
    config = GenerationConfig(max_new_tokens=6, block_size=3, policy="margin", temperature=0.9, top_k=10)
    pairs = [([2, 3], [4]), ([5, 6, 7, 8], [9, 10, 11]), ([12], [])]
    assert_batch_invariant(
        lambda items, s: infill(transformer, [a for a, _ in items], [b for _, b in items], config, seeds=s), pairs, [1, 2, 3]
    )


# ---------------------------------------------------------------------------- events, trace, errors


def test_events_and_trace_agree():
    model = tiny_transformer(eos_token_id=None)
    events: list[StepEvent] = []
    config = GenerationConfig(max_new_tokens=8, block_size=4, steps=4, trace=True)
    result = generate(model, [[2, 3], [4]], config, on_step=events.append)
    assert len(events) == len(result.trace) == result.nfe == 4
    before = torch.full((2, 8), 39)
    for i, (e, t) in enumerate(zip(events, result.trace)):
        assert e.step == i and e.nfe == i + 1 and torch.equal(e.canvas, t)
        assert torch.equal(e.committed, (before == 39) & (t != 39))
        before = t
    assert [r.tolist() for r in result.trace[-1]] == result.sequences and bool(events[-1].done.all())


@pytest.mark.parametrize(
    "kwargs",
    [dict(policy="nope"), dict(steps=0), dict(threshold=1.5), dict(temperature=-0.1), dict(top_p=0.0),
     dict(top_p=1.5), dict(max_new_tokens=0), dict(top_k=0), dict(factor=0.0)],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(UnmaskError, match="invalid generation config"):
        GenerationConfig(**kwargs)


def test_bad_requests_raise():
    model = tiny_transformer()
    with pytest.raises(UnmaskError, match="max_seq_len"):
        generate(model, [[2] * 44], GenerationConfig(max_new_tokens=8))
    with pytest.raises(UnmaskError, match="mask_token_id"):
        generate(tiny_transformer(mask_token_id=None), [[2]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(UnmaskError, match="vocabulary"):
        generate(model, [[2, 400]], GenerationConfig(max_new_tokens=4))
    with pytest.raises(UnmaskError, match="seeds"):
        generate(model, [[2], [3]], GenerationConfig(max_new_tokens=4), seeds=[1])
    with pytest.raises(UnmaskError, match="non-empty prompt"):
        generate(PositionModel(lambda p: 2, shifted=True), [[]], GenerationConfig(max_new_tokens=4))
    config = GenerationConfig(max_new_tokens=4)
    config.steps = 0  # mutated after construction: checked again at generation time
    with pytest.raises(UnmaskError, match="steps"):
        generate(model, [[2]], config)
