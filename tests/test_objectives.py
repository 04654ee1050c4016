"""Training objectives checked against exact enumeration on tiny vocabularies and lengths.

The Monte-Carlo losses must average to the exact bounds of ``unmask.diffusion.exact``; those
bounds are themselves checked against a known joint (an oracle model makes them tight), against
a brute-force average over generation orders, and against numerical quadrature.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from scipy import integrate
from torch import Tensor, nn

from unmask.diffusion.exact import (
    OracleModel,
    any_order_nll,
    conditional_nll,
    enumerate_sequences,
    exact_block_elbo,
    exact_elbo,
    mask_weight,
)
from unmask.diffusion.objectives import block_diffusion_mask, compute_loss, diffusion_loss, masked_token_nll
from unmask.diffusion.schedule import DEFAULT_EPS, mask_tokens, sample_times
from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer

VOCAB = 4  # ordinary tokens 0..3; [MASK] is id 4
MASK = VOCAB
COPIES = 128  # rows per Monte-Carlo draw: copies of one sequence
DRAWS = 150  # Monte-Carlo draws (independent generator seeds)
Z_OK = 4.0  # a correct estimator lands within this many standard errors of the exact value
Z_WRONG = 8.0  # a wrong one must land at least this far away


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra threads only contend for the few shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(
    seed: int = 0, attention: str = "bidirectional", block_size: int = 32, shifted: bool = False
) -> Transformer:
    """A random transformer with sharp, context-dependent conditionals (large init)."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB + 1, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16,
        attention=attention, block_size=block_size, shifted=shifted,
        mask_token_id=None if shifted else MASK, init_std=0.4,
    )
    return Transformer(config).eval()


def oracle(seed: int, length: int) -> OracleModel:
    return OracleModel.random(VOCAB, length, torch.Generator().manual_seed(seed))


def random_sequence(length: int, seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


class Spy(nn.Module):
    """Passes calls through to a model and records each call's ids and logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.ids: list[Tensor] = []
        self.logits: list[Tensor] = []

    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        out = self.model(ids, *args, **kwargs)
        self.ids.append(ids.clone())
        self.logits.append(out.detach().clone())
        return out


def z_score(estimate: Callable[[torch.Generator], Tensor], exact: float, draws: int = DRAWS) -> float:
    """(Monte-Carlo mean - exact) in standard errors, one independent seed per draw."""
    with torch.no_grad():
        values = torch.tensor(
            [float(estimate(torch.Generator().manual_seed(seed))) for seed in range(draws)], dtype=torch.float64
        )
    se = max(values.std().item() / math.sqrt(draws), 1e-12)  # a constant estimator has no spread
    return (values.mean().item() - exact) / se


# --- Monte-Carlo objectives against the exact bounds ------------------------------------------


@pytest.mark.parametrize("kind", ["transformer", "oracle"])
def test_diffusion_loss_averages_to_exact_elbo(kind: str) -> None:
    # Catches a wrong time weight, masking rate, normalisation or [MASK] handling in the
    # pretraining loss: its mean must equal the enumerated bound for t ~ U[eps, 1].
    length = 5
    model = tiny_model() if kind == "transformer" else oracle(0, length)
    x0 = random_sequence(length, 1)
    batch = x0.expand(COPIES, -1)
    exact = exact_elbo(model, x0, eps=DEFAULT_EPS) / length
    z = z_score(lambda g: compute_loss("diffusion", model, batch, generator=g).loss, exact)
    assert abs(z) < Z_OK, z
    out = compute_loss("diffusion", model, batch, generator=torch.Generator().manual_seed(0))
    assert out.n_tokens == COPIES * length
    assert torch.allclose(out.loss, out.nll_sum / out.n_tokens)
    if kind == "oracle":  # and the bound being estimated is the true NLL (up to the eps cut)
        assert abs(exact * length + model.log_prob(x0)) < 0.05


def test_sft_loss_averages_to_exact_answer_elbo() -> None:
    # Catches masking the prompt, counting prompt tokens, or normalising by the whole length or
    # by the batch's total answer tokens instead of each sequence's answer length.
    length = 5
    model = oracle(1, length)
    # The likeliest and the least likely sequence: their per-token bounds differ a lot, so a
    # per-batch instead of per-sequence normalisation moves the mean far.
    seqs = [model.sequences[model.log_q.argmax()], model.sequences[model.log_q.argmin()]]
    prompts = [1, 3]
    rows = [i % 2 for i in range(COPIES)]  # interleaved, so both get times from every stratum
    batch = torch.stack([seqs[r] for r in rows])
    prompt_mask = torch.stack([torch.arange(length) < prompts[r] for r in rows])
    exact = sum(exact_elbo(model, s, p, eps=DEFAULT_EPS) / (length - p) for s, p in zip(seqs, prompts)) / 2
    z = z_score(lambda g: compute_loss("sft", model, batch, prompt_mask=prompt_mask, generator=g).loss, exact)
    assert abs(z) < Z_OK, z
    out = compute_loss("sft", model, batch, prompt_mask=prompt_mask, generator=torch.Generator().manual_seed(0))
    assert out.n_tokens == int((~prompt_mask).sum())


def test_sft_never_masks_the_prompt() -> None:
    # Catches prompt tokens reaching the model as [MASK], and answer tokens left clean at t = 1.
    spy = Spy(tiny_model())
    x0 = torch.stack([random_sequence(6, s) for s in range(4)])
    prompt_mask = torch.arange(6)[None] < torch.tensor([[0], [1], [3], [5]])
    for seed in range(20):
        compute_loss("sft", spy, x0, prompt_mask=prompt_mask, generator=torch.Generator().manual_seed(seed))
    seen = torch.stack(spy.ids)
    assert torch.equal(seen[:, prompt_mask], x0[prompt_mask].expand(len(spy.ids), -1))
    assert bool((seen[:, ~prompt_mask] == MASK).any())
    diffusion_loss(spy, x0, t=torch.ones(4), prompt_mask=prompt_mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(spy.ids[-1], torch.where(prompt_mask, x0, torch.full_like(x0, MASK)))


def test_block_loss_averages_to_exact_block_elbo() -> None:
    # Catches a block loss that lets a noisy block see itself clean or later blocks, or that
    # weighs a block's tokens by another block's time.
    length, block = 5, 2
    model = tiny_model(2, attention="block", block_size=block)
    x0 = random_sequence(length, 4)
    batch = x0.expand(COPIES, -1)
    exact = exact_block_elbo(model, x0, eps=DEFAULT_EPS) / length
    z = z_score(lambda g: compute_loss("block", model, batch, generator=g).loss, exact)
    assert abs(z) < Z_OK, z


# --- the harness has power: wrong estimators are rejected -------------------------------------


def _wrong_unweighted(model: nn.Module, x0: Tensor, g: torch.Generator) -> Tensor:
    t = sample_times(x0.shape[0], g)
    xt, masked = mask_tokens(x0, t, MASK, generator=g)
    return masked_token_nll(model(xt), x0, masked, MASK).sum() / x0.numel()  # weight 1, not 1/t


def _wrong_keeps_mask_logit(model: nn.Module, x0: Tensor, g: torch.Generator) -> Tensor:
    t = sample_times(x0.shape[0], g)
    xt, masked = mask_tokens(x0, t, MASK, generator=g)
    nll = F.cross_entropy(model(xt).flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)
    return (torch.where(masked, nll, 0.0).sum(1) / t).sum() / x0.numel()


def _wrong_sees_clean_input(model: nn.Module, x0: Tensor, g: torch.Generator) -> Tensor:
    t = sample_times(x0.shape[0], g)
    _, masked = mask_tokens(x0, t, MASK, generator=g)
    return (masked_token_nll(model(x0), x0, masked, MASK).sum(1) / t).sum() / x0.numel()


@pytest.mark.parametrize("wrong", [_wrong_unweighted, _wrong_keeps_mask_logit, _wrong_sees_clean_input])
def test_harness_rejects_wrong_estimators(wrong: Callable) -> None:
    # Shows the Monte-Carlo comparison above can fail: each of these plausible bugs lands far
    # outside the tolerance that the real objectives meet.
    length = 5
    model = oracle(0, length)
    x0 = random_sequence(length, 1)
    batch = x0.expand(COPIES, -1)
    exact = exact_elbo(model, x0, eps=DEFAULT_EPS) / length
    z = z_score(lambda g: wrong(model, batch, g), exact)
    assert abs(z) > Z_WRONG, z


# --- the exact bounds themselves ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "length", "eps"), [(1, 1, 0.0), (1, 4, 0.0), (3, 5, 0.0), (6, 6, 0.0), (1, 5, 0.3), (4, 6, 1e-3)]
)
def test_mask_weight_matches_quadrature(k: int, length: int, eps: float) -> None:
    # Catches a wrong closed form of the per-mask-set weight or of its eps cut.
    integral, _ = integrate.quad(lambda t: t ** (k - 1) * (1 - t) ** (length - k), eps, 1.0)
    assert mask_weight(k, length, eps) == pytest.approx(integral / (1 - eps), rel=1e-9)


def test_exact_elbo_is_the_average_over_generation_orders() -> None:
    # Catches wrong mask-set weights or sums in exact_elbo, independently of the t-integral: the
    # linear-schedule ELBO equals E_order[sum_j -log p(x_order_j | revealed so far)].
    model = tiny_model(3)
    x0, prompt = random_sequence(5, 5), 1
    answer = list(range(prompt, 5))
    orders = list(itertools.permutations(answer))
    rows, targets = [], []
    for order in orders:
        for j, pos in enumerate(order):
            row = x0.clone()
            row[list(order[j:])] = MASK
            rows.append(row)
            targets.append(pos)
    with torch.no_grad():
        logits = model(torch.stack(rows)).double()
    logits[..., MASK] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    nll = -torch.stack([logp[r, pos, x0[pos]] for r, pos in enumerate(targets)])
    brute = nll.sum().item() / len(orders)
    assert exact_elbo(model, x0, prompt_len=prompt) == pytest.approx(brute, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_elbo_upper_bounds_any_order_nll(seed: int) -> None:
    # Catches a bound below the likelihood it must bound (a sign or weight error in either).
    model = tiny_model(seed)
    gaps = []
    for s in range(3):
        x0 = random_sequence(5, 10 * seed + s)
        elbo, nll = exact_elbo(model, x0), any_order_nll(model, x0)
        assert elbo >= nll - 1e-9
        gaps.append(elbo - nll)
    assert max(gaps) > 1e-3  # the bound is not trivially tight for a model with inconsistent conditionals


def test_any_order_likelihood_is_normalised() -> None:
    # Catches an any-order "likelihood" that is not one (e.g. the average log-probability over
    # orders, which equals the ELBO): summed over every sequence it must give exactly 1.
    model = tiny_model(4)
    seqs = enumerate_sequences(VOCAB, 3)
    total = sum(math.exp(-any_order_nll(model, s)) for s in seqs)
    assert total == pytest.approx(1.0, abs=1e-6)
    assert sum(math.exp(-exact_elbo(model, s)) for s in seqs) < 1.0


@pytest.mark.parametrize("seed", range(3))
def test_bounds_are_tight_for_an_oracle(seed: int) -> None:
    # Catches any deviation of the exact bounds from the truth: with exact conditionals of q,
    # ELBO, any-order NLL and block ELBO all equal -log q(x), and the prompted ELBO -log q(answer | prompt).
    length = 5
    model = oracle(seed, length)
    x0 = random_sequence(length, seed)
    target = -model.log_prob(x0)
    assert exact_elbo(model, x0) == pytest.approx(target, abs=1e-4)
    assert any_order_nll(model, x0) == pytest.approx(target, abs=1e-4)
    assert exact_block_elbo(model, x0, block_size=2) == pytest.approx(target, abs=1e-4)
    prompt = 2
    completions = [torch.cat([x0[:prompt], tail]) for tail in enumerate_sequences(VOCAB, length - prompt)]
    log_prompt = torch.logsumexp(torch.tensor([model.log_prob(c) for c in completions]), 0).item()
    assert exact_elbo(model, x0, prompt_len=prompt) == pytest.approx(target + log_prompt, abs=1e-4)


def test_conditional_nll_of_an_oracle_is_the_conditional_of_q() -> None:
    # Catches a conditional table that keeps the [MASK] logit (the oracle gives it real mass),
    # conditions on the wrong positions, or misindexes mask sets, checked against q summed directly.
    length = 4
    model = oracle(0, length)
    x0 = random_sequence(length, 0)
    nll = conditional_nll(model, x0)
    q = model.log_q.exp()
    for m in range(1 << length):
        hidden = torch.tensor([m >> i & 1 == 1 for i in range(length)])
        agrees = (model.sequences[:, ~hidden] == x0[~hidden]).all(dim=1)
        for i in range(length):
            if hidden[i]:
                hit = agrees & (model.sequences[:, i] == x0[i])
                expected = -math.log(q[hit].sum().item() / q[agrees].sum().item())
                assert nll[m, i].item() == pytest.approx(expected, abs=1e-5)
            else:
                assert nll[m, i].item() == 0.0


# --- block diffusion: the vectorised pass equals separate block-causal passes -----------------


def test_block_training_pass_matches_separate_block_causal_passes() -> None:
    # Catches a training attention mask that differs from inference with an exact block cache:
    # noisy tokens seeing their own block clean, later blocks, or other noisy blocks.
    length, block = 7, 3  # ragged last block
    model = tiny_model(5, attention="block", block_size=block)
    spy = Spy(model)
    x0 = torch.stack([random_sequence(length, s) for s in range(3)])
    compute_loss("block", spy, x0, generator=torch.Generator().manual_seed(0))
    xt, logits = spy.ids[0][:, :length], spy.logits[0]
    assert torch.equal(spy.ids[0][:, length:], x0)
    assert bool(((xt == x0) | (xt == MASK)).all()) and bool((xt == MASK).any())
    with torch.no_grad():
        for start in range(0, length, block):
            end = min(start + block, length)
            alone = model(torch.cat([x0[:, :start], xt[:, start:end]], dim=1))
            assert (alone[:, start:end] - logits[:, start:end]).abs().max().item() < 1e-5
        # The comparison has power: letting noisy tokens also see their own clean block changes the logits.
        leaky = block_diffusion_mask(length, block, "cpu").clone()
        same = (torch.arange(length)[:, None] // block) == (torch.arange(length)[None, :] // block)
        leaky[0, 0, :length, length:] |= same
        positions = torch.arange(length).repeat(2).expand(3, -1)
        wrong = model(torch.cat([xt, x0], 1), positions, attn_mask=leaky, logits_index=slice(0, length))
        assert (wrong - logits).abs().max().item() > 1e-3


# --- autoregressive loss ------------------------------------------------------------------------


@pytest.mark.parametrize("prompted", [False, True])
def test_ar_loss_is_the_next_token_nll(prompted: bool) -> None:
    # Catches an off-by-one shift, a non-causal pass, or prompt tokens counted in the loss.
    model = tiny_model(6, attention="causal", shifted=True)
    x0 = torch.stack([random_sequence(6, s) for s in range(3)])
    prompt_lens = [2, 0, 4] if prompted else [0, 0, 0]
    prompt_mask = torch.arange(6)[None] < torch.tensor(prompt_lens)[:, None]
    with torch.no_grad():
        out = compute_loss("ar", model, x0, prompt_mask=prompt_mask if prompted else None)
        total, count, per_row = 0.0, 0, []
        for b in range(3):
            row = []
            for j in range(max(1, prompt_lens[b]), 6):  # token j predicted from the prefix alone
                logp = torch.log_softmax(model(x0[b : b + 1, :j])[0, -1].double(), -1)
                row.append(-logp[x0[b, j]].item())
            total, count = total + sum(row), count + len(row)
            per_row.append(sum(row) / len(row))
    assert out.n_tokens == count
    assert out.nll_sum.item() == pytest.approx(total, rel=1e-5)
    # with a prompt (SFT) each sequence is normalised by its own answer length, then averaged
    assert out.loss.item() == pytest.approx(sum(per_row) / 3 if prompted else total / count, rel=1e-5)
