"""Adapting an autoregressive model into a diffusion model: shifted objectives with complementary masks.

An AR checkpoint's head reads the hidden state at position i as a prediction of token i + 1.
The adapted model keeps that meaning (``shifted``): the prediction for a masked position i is
read at i - 1, so training starts from a model that already predicts the next token well.

- **Block diffusion** (``attention = "block"``, Fast-dLLM v2 / SDAR style): the sequence is cut
  into blocks; a noisy block sees itself and the clean blocks before it. Each sequence is
  trained in two views whose masks are complements (every token is a target exactly once), and
  both views share one clean copy: the input is ``[view 1 ; view 2 ; clean]`` (3L tokens) under
  ``three_stream_mask``. The first token of a block is predicted from the last clean token of
  the block before, exactly what decoding with the exact block cache reads.
- **Full attention** (``attention = "bidirectional"``, Dream / DiffuLLaMA style): the two views
  are two rows; attention is causal OR'd with random non-causal entries whose share rises from
  0 to 1 over ``anneal_steps`` (attention-mask annealing).

**Distillation** (``distill`` in [0, 1]): the frozen AR base's next-token distribution on the
clean sequence is a dense target at every position; the loss mixes cross-entropy with the
true token and the KL divergence to the base, ``(1 - distill) * CE + distill * KL``. The reported
``nll_sum`` is always the ELBO-weighted cross-entropy (1/t for a view masked at rate t), so
validation figures stay an upper bound on the per-token NLL whatever the mix.

**SFT** (``prompt_mask``, True on the prompt): prompt positions are never masked in either view
and never targets; the loss is each sequence's sum over its answer tokens divided by its answer
length (the answer tokens after position 0, the ones that can be predicted), averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.diffusion.objectives import LossOutput
from unmask.diffusion.schedule import DEFAULT_EPS, sample_times
from unmask.models.config import AttentionMode
from unmask.models.transformer import Transformer


def three_stream_mask(length: int, block_size: int, device: torch.device | str) -> Tensor:
    """Attention over ``[view 1 ; view 2 ; clean]`` (3L keys), shape [1, 1, 3L, 3L].

    A noisy token of block b sees its own view's block b and the clean blocks before b; a clean
    token sees the clean blocks up to its own (block-causal), never a noisy one.
    """
    block = torch.arange(length, device=device) // block_size
    same = block[:, None] == block[None, :]
    before = block[None, :] < block[:, None]
    upto = block[None, :] <= block[:, None]
    none = torch.zeros_like(same)
    rows = [
        torch.cat([same, none, before], dim=1),
        torch.cat([none, same, before], dim=1),
        torch.cat([none, none, upto], dim=1),
    ]
    return torch.cat(rows, dim=0)[None, None]


def annealed_mask(length: int, ratio: float, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """Causal attention with a share ``ratio`` of the non-causal entries opened at random, [1, 1, L, L]."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if ratio >= 1.0:
        return torch.ones_like(causal)[None, None]
    noise = torch.rand(length, length, generator=generator, device="cpu" if generator is not None else device)
    return (causal | (noise.to(device) < ratio))[None, None]


def complementary_views(
    x0: Tensor, mask_id: int, generator: torch.Generator | None, eps: float, maskable: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Two noisy views [2, B, L] with complementary masks, their mask rates [2, B] and masks [2, B, L].

    ``maskable`` [B, L] (optional): positions outside it stay clean in both views."""
    b, length = x0.shape
    t = sample_times(b, generator, eps, device=x0.device)
    u = torch.rand(b, length, generator=generator, device="cpu" if generator is not None else x0.device).to(x0.device)
    first = u < t[:, None]
    masked = torch.stack([first, ~first])
    if maskable is not None:
        masked &= maskable
    rates = torch.stack([t, 1 - t]).clamp(min=eps)
    views = torch.where(masked, torch.full_like(x0, mask_id), x0.expand(2, -1, -1))
    return views, rates, masked


def predictions(
    model: Transformer, x0: Tensor, views: Tensor, target: Tensor, anneal: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Logits [N, V] for the N ``target`` positions [2, B, L] (in ``target[v, b, i]`` order), each read
    at i - 1 as decoding would read it."""
    config = model.config
    b, length = x0.shape
    positions = torch.arange(length, device=x0.device)
    if config.attention != AttentionMode.BLOCK:
        ids = views.reshape(2 * b, length)
        attn = annealed_mask(length, anneal, generator, x0.device)
        source = torch.zeros(2 * b, length, dtype=torch.bool, device=x0.device)
        source[:, :-1] = target.reshape(2 * b, length)[:, 1:]
        return model(ids, positions.expand(2 * b, -1), attn_mask=attn, logits_index=source)
    # Inside a block the source is the same view's i - 1; at a block's first position it is the
    # clean stream's i - 1, the last token of the finished block before.
    first = positions % config.block_size == 0
    source = torch.stack([torch.where(first, 2 * length, v * length) + positions - 1 for v in range(2)])
    source = source[:, None, :].expand(2, b, length)[target]
    rows = torch.arange(b, device=x0.device)[None, :, None].expand(2, b, length)[target]
    # Every target is masked in one view only, so no (row, source) pair is needed twice.
    wanted = torch.zeros(b, 3 * length, dtype=torch.bool, device=x0.device)
    wanted[rows, source] = True
    ids = torch.cat([views[0], views[1], x0], dim=1)
    attn = three_stream_mask(length, config.block_size, x0.device)
    logits = model(ids, positions.repeat(3).expand(b, -1), attn_mask=attn, logits_index=wanted)
    order = torch.full((b, 3 * length), -1, dtype=torch.long, device=x0.device)
    order[wanted] = torch.arange(logits.shape[0], device=x0.device)
    return logits[order[rows, source]]


def adapt_loss(
    model: Transformer,
    x0: Tensor,
    *,
    teacher: Transformer | None = None,
    distill: float = 0.0,
    anneal: float = 1.0,
    prompt_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = DEFAULT_EPS,
) -> LossOutput:
    """The shifted diffusion loss of an adapted model (block-causal or full attention), see the module doc.

    ``anneal``: share of non-causal attention entries open (full-attention models; 1 = bidirectional).
    ``prompt_mask`` [B, L]: True on prompt (and ignored padding) tokens, never masked nor targets (SFT).
    """
    config = model.config
    mask_id = config.mask_token_id
    if mask_id is None or not config.shifted:
        raise ValueError("adapt_loss needs a shifted model with a mask_token_id")
    b, length = x0.shape
    maskable = None if prompt_mask is None else ~prompt_mask
    views, rates, masked = complementary_views(x0, mask_id, generator, eps, maskable)
    target = masked.clone()
    target[:, :, 0] = False  # nothing precedes the first position
    logits = predictions(model, x0, views, target, anneal, generator).clone()
    logits[:, mask_id] = float("-inf")
    log_probs = F.log_softmax(logits, dim=-1)
    tokens = x0.expand(2, -1, -1)[target]
    nll = -log_probs.gather(1, tokens[:, None])[:, 0]
    rows = torch.arange(b, device=x0.device)[None, :, None].expand(2, b, length)[target]
    weights = (1.0 / rates)[:, :, None].expand(2, b, length)[target]
    per_seq = torch.zeros(b, dtype=nll.dtype, device=x0.device).index_add_(0, rows, (nll * weights).detach())
    share = None  # SFT: a target's weight in the mean of the per-sequence means over the answer
    if maskable is not None:
        share = (1.0 / maskable[:, 1:].sum(dim=1).clamp(min=1))[rows] / b
    loss = nll.mean() if share is None else (nll * share).sum()
    if teacher is not None and distill > 0:
        with torch.no_grad():
            every = torch.ones(b, length, dtype=torch.bool, device=x0.device)
            every[:, -1] = False
            reference = teacher(x0, logits_index=every).view(b, length - 1, -1)
        at = torch.arange(length, device=x0.device).expand(2, b, length)[target] - 1
        reference = reference[rows, at]
        reference[:, mask_id] = float("-inf")
        log_p = F.log_softmax(reference.float(), dim=-1)
        # 0 * log 0 = 0, also at [MASK], where both distributions are -inf
        kl = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_probs), torch.zeros_like(log_p)).sum(-1)
        loss = (1 - distill) * loss + distill * (kl.mean() if share is None else (kl * share).sum())
    # Each view is one estimate of the sequence's bound: report their mean.
    # The tokens the bound covers: every position but the first (nothing precedes it).
    n_tokens = b * (length - 1) if maskable is None else int(maskable[:, 1:].sum())
    return LossOutput(loss, per_seq.sum() / 2, n_tokens)
