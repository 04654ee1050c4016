"""Exact masked-diffusion bounds by enumeration, for tiny vocabularies and lengths.

Reference values that need no sampling: the Monte-Carlo training objectives must average to
``exact_elbo`` / ``exact_block_elbo``, the bound must sit above the model's any-order NLL, and
an ``OracleModel`` (exact conditionals of a known joint q) must make both equal -log q(x).
Everything enumerates the 2^L mask sets of a sequence, so keep L small (a few tokens).

Masks are indexed by integers: bit i of m is set when position i is masked.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from unmask.models.config import AttentionMode, ModelConfig
from unmask.models.transformer import select_positions

MAX_ENUM_LEN = 12  # longest span whose 2^L mask sets we are willing to enumerate


def enumerate_sequences(vocab: int | Sequence[int], length: int) -> Tensor:
    """Every sequence of ``length`` tokens over ``vocab`` (a size, meaning ids 0..size-1, or a list
    of ids), in lexicographic order: shape [len(vocab) ** length, length]."""
    ids = list(range(vocab)) if isinstance(vocab, int) else list(vocab)
    return torch.tensor(list(itertools.product(ids, repeat=length)), dtype=torch.long).view(-1, length)


def mask_sets(length: int) -> Tensor:
    """All 2^length mask sets as a boolean table [2^length, length]; row m masks the set bits of m."""
    if not 0 <= length <= MAX_ENUM_LEN:
        raise ValueError(f"cannot enumerate the mask sets of {length} positions (at most {MAX_ENUM_LEN})")
    m = torch.arange(2**length)[:, None]
    return (m >> torch.arange(length)) & 1 == 1


def mask_weight(k: int, length: int, eps: float = 0.0) -> float:
    """ELBO weight of one mask set of size k among ``length`` maskable positions.

    The linear schedule masks that exact set with probability t^k (1-t)^(length-k) and weighs
    its loss by 1/t; averaged over t ~ U[eps, 1] this is
    (1/(1-eps)) * integral_eps^1 t^(k-1) (1-t)^(length-k) dt, which for eps = 0 is
    (k-1)! (length-k)! / length!.
    """
    if not 1 <= k <= length:
        raise ValueError(f"mask set size {k} outside 1..{length}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must lie in [0, 1), got {eps}")
    full = math.factorial(k - 1) * math.factorial(length - k) / math.factorial(length)
    # The integral over [0, eps], expanded term by term (no cancellation against `full`).
    head = sum(
        math.comb(length - k, j) * (-1) ** j * eps ** (k + j) / (k + j) for j in range(length - k + 1)
    )
    return (full - head) / (1.0 - eps)


def _mask_id(model: nn.Module) -> int:
    config = model.config
    if config.mask_token_id is None:
        raise ValueError("exact diffusion bounds need config.mask_token_id")
    if config.shifted:
        raise ValueError("exact diffusion bounds expect a non-shifted model (logit i predicts token i)")
    return config.mask_token_id


@torch.no_grad()
def conditional_nll(model: nn.Module, x0: Tensor, prompt_len: int = 0) -> Tensor:
    """-log p(x0_i | x0 with mask set m applied) for every mask set m of the answer positions.

    Returns float64 [2^A, A] (A = len(x0) - prompt_len), zero where position i is not masked.
    The model sees the whole of ``x0`` (prompt clean) with its own attention; [MASK] is never a
    prediction, so its logit is dropped before normalising.
    """
    if x0.dim() != 1:
        raise ValueError(f"x0 must be one sequence [L], got shape {tuple(x0.shape)}")
    mask_id = _mask_id(model)
    answer = x0.shape[0] - prompt_len
    if not 0 <= prompt_len < x0.shape[0]:
        raise ValueError(f"prompt_len {prompt_len} leaves no answer in a sequence of {x0.shape[0]}")
    if bool((x0 == mask_id).any()):
        raise ValueError("x0 must not contain the [MASK] token")
    masks = mask_sets(answer).to(x0.device)
    full = torch.cat([torch.zeros(masks.shape[0], prompt_len, dtype=torch.bool, device=x0.device), masks], 1)
    ids = torch.where(full, torch.full_like(full, mask_id, dtype=x0.dtype), x0.expand(full.shape[0], -1))
    logits = model(ids).double()
    keep = torch.arange(logits.shape[-1], device=logits.device) != mask_id
    logp = torch.log_softmax(logits[..., keep], dim=-1)
    # Index of each target in the vocabulary without [MASK].
    target = (x0 - (x0 > mask_id).long()).expand(full.shape[0], -1)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)[:, prompt_len:]
    return torch.where(masks, nll, torch.zeros_like(nll))


def _elbo_from_table(nll: Tensor, eps: float) -> float:
    answer = nll.shape[1]
    masks = mask_sets(answer)
    sizes = masks.sum(dim=1).tolist()
    totals = nll.sum(dim=1).tolist()
    return sum(mask_weight(k, answer, eps) * total for k, total in zip(sizes, totals) if k > 0)


def exact_elbo(model: nn.Module, x0: Tensor, prompt_len: int = 0, eps: float = 0.0) -> float:
    """The masked-diffusion bound of one sequence, exactly, in nats for the whole answer.

    E_{t ~ U[eps, 1]} E_{x_t} [(1/t) sum_{i masked} -log p(x0_i | x_t)], where only the positions
    after ``prompt_len`` are maskable. eps = 0 gives the true ELBO; eps > 0 gives what a trainer
    that draws t from U[eps, 1] estimates. Divide by the answer length for the per-token loss.
    """
    return _elbo_from_table(conditional_nll(model, x0, prompt_len), eps)


def exact_block_elbo(model: nn.Module, x0: Tensor, block_size: int | None = None, eps: float = 0.0) -> float:
    """Block-diffusion bound of one sequence, exactly: the sum over blocks of each block's ELBO
    given the clean blocks before it, in nats for the whole sequence.

    Each block is scored by running the model on (clean earlier blocks, noisy block) alone, with
    the model's own attention: for a block-causal model this is what an exact block cache sees.
    """
    config = model.config
    block_size = config.block_size if block_size is None else block_size
    if config.attention == AttentionMode.BLOCK and block_size != config.block_size:
        raise ValueError(f"block_size {block_size} differs from the model's block size {config.block_size}")
    length = x0.shape[0]
    return sum(
        exact_elbo(model, x0[: min(start + block_size, length)], prompt_len=start, eps=eps)
        for start in range(0, length, block_size)
    )


def any_order_nll(model: nn.Module, x0: Tensor, prompt_len: int = 0) -> float:
    """-log of the probability that the model generates x0's answer when it reveals the answer
    tokens one at a time in a uniformly random order (the average over all A! orders of the
    product of conditionals). It is a proper likelihood, and by Jensen the ELBO bounds it from above.
    """
    nll = conditional_nll(model, x0, prompt_len)
    answer = nll.shape[1]
    # log_paths[m]: log of the summed probability, over the |m|! orders of revealing the masked set m,
    # of producing x0 on m given the rest (revealing i from state m leaves m without i).
    log_paths = torch.full((2**answer,), float("-inf"), dtype=torch.float64)
    log_paths[0] = 0.0
    for m in range(1, 2**answer):
        terms = [-nll[m, i] + log_paths[m & ~(1 << i)] for i in range(answer) if m >> i & 1]
        log_paths[m] = torch.logsumexp(torch.stack(terms), dim=0)
    return -(log_paths[-1].item() - math.lgamma(answer + 1))


class OracleModel(nn.Module):
    """A stand-in model whose logits are the exact conditionals of a known joint q over V^L.

    Called like ``Transformer`` on ids [B, T] with T <= L: logit [b, i, v] is log q(x_i = v and
    x agrees with every visible token of row b), so its softmax over v is q(x_i = v | visible).
    [MASK] tokens and positions past T are marginalised out: a prefix alone is conditioned on
    exactly, as a block-causal model conditions on earlier blocks. The [MASK] logit is the finite
    ``mask_logit`` on purpose, so code that forgets to exclude [MASK] sees wrong probabilities.
    """

    def __init__(self, log_q: Tensor, mask_logit: float = 0.0) -> None:
        super().__init__()
        vocab, length = log_q.shape[0], log_q.dim()
        if any(size != vocab for size in log_q.shape):
            raise ValueError(f"log_q must have shape [V] * L, got {tuple(log_q.shape)}")
        self.config = ModelConfig(
            vocab_size=vocab + 1, d_model=8, n_layers=1, n_heads=1, max_seq_len=length, mask_token_id=vocab
        )
        self.length = length
        self.mask_logit = mask_logit
        flat = log_q.double().flatten()
        self.register_buffer("log_q", flat - torch.logsumexp(flat, dim=0))
        self.register_buffer("sequences", enumerate_sequences(vocab, length))

    @classmethod
    def random(cls, vocab: int, length: int, generator: torch.Generator, scale: float = 1.5) -> "OracleModel":
        """An oracle for a random joint with full support (log-probabilities ~ scale * N(0, 1))."""
        return cls(scale * torch.randn([vocab] * length, generator=generator, dtype=torch.float64))

    def log_prob(self, x: Tensor) -> float:
        """log q(x) of one full sequence [L]."""
        vocab = self.config.mask_token_id
        index = sum(int(tok) * vocab ** (self.length - 1 - i) for i, tok in enumerate(x.tolist()))
        return self.log_q[index].item()

    def forward(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        valid: Tensor | None = None,
        cache: object | None = None,
        cache_start: int | None = None,
        logits_index: Tensor | slice | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        b, t = ids.shape
        if t > self.length:
            raise ValueError(f"the oracle models {self.length} tokens, got {t}")
        if positions is not None and not torch.equal(positions, torch.arange(t, device=ids.device).expand(b, t)):
            raise ValueError("the oracle reads tokens at positions 0..T-1 only")
        if valid is not None or cache is not None or attn_mask is not None:
            raise ValueError("the oracle conditions on every visible token: no padding, cache or attention mask")
        vocab = self.config.mask_token_id
        padded = torch.full((b, self.length), vocab, dtype=torch.long, device=ids.device)
        padded[:, :t] = ids
        hidden = padded == vocab
        agrees = ((self.sequences[None] == padded[:, None]) | hidden[:, None]).all(dim=-1)  # [B, N]
        weight = torch.where(agrees, self.log_q, torch.full_like(self.log_q, float("-inf")))
        top = weight.max(dim=1, keepdim=True).values
        onehot = nn.functional.one_hot(self.sequences, vocab).double().flatten(1)  # [N, L * V]
        # Sum of q over the agreeing sequences with x_i = v, scaled by exp(-top) to stay in range.
        mass = (weight - top).exp() @ onehot
        logits = (mass.log() + top).view(b, self.length, vocab)[:, :t]  # [B, T, V]
        logits = torch.cat([logits, torch.full_like(logits[..., :1], self.mask_logit)], dim=-1)
        return select_positions(logits, logits_index).float()
