"""Training objectives: masked-diffusion ELBO (pretraining and SFT), block diffusion, AR.

Every objective takes the model and a batch of token ids and returns a ``LossOutput`` whose
``loss`` is what the optimiser minimises and whose ``nll_sum``/``n_tokens`` let a validation
loop aggregate an exact per-token figure over many batches (ELBO bound or AR NLL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from unmask.diffusion.schedule import DEFAULT_EPS, mask_tokens, sample_times
from unmask.models.transformer import Transformer

OBJECTIVES = ("diffusion", "sft", "block", "ar")


@dataclass
class LossOutput:
    loss: Tensor  # scalar to minimise
    nll_sum: Tensor  # sum over the batch of the per-sequence bound (in nats), detached
    n_tokens: int  # tokens the bound covers (sequence lengths, or answer lengths for SFT)


def _require_mask_id(model: Transformer) -> int:
    mask_id = model.config.mask_token_id
    if mask_id is None:
        raise ValueError("diffusion objectives need config.mask_token_id")
    if model.config.shifted:
        raise ValueError("diffusion objectives expect a non-shifted model (logit i predicts token i)")
    return mask_id


def masked_nll_flat(logits: Tensor, targets: Tensor, mask_id: int) -> Tensor:
    """-log p(target) for flat [N, V] logits, [MASK] excluded from the normaliser."""
    logits = logits.clone()
    logits[:, mask_id] = float("-inf")
    return F.cross_entropy(logits, targets, reduction="none")


def masked_token_nll(logits: Tensor, x0: Tensor, masked: Tensor, mask_id: int) -> Tensor:
    """-log p(x0_i | x_t) at every masked position (0 elsewhere); [MASK] is never a prediction."""
    nll = masked_nll_flat(logits.flatten(0, -2), x0.flatten(), mask_id).view_as(x0)
    return torch.where(masked, nll, torch.zeros_like(nll))


def diffusion_loss(
    model: Transformer,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    prompt_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = DEFAULT_EPS,
) -> LossOutput:
    """Masked-diffusion ELBO: E_t E_xt [(1/t) sum_{i masked} -log p(x0_i | x_t)] / L.

    With ``prompt_mask`` (True on prompt tokens) this is the SFT variant: prompt tokens are
    never masked, and each sequence's bound is normalised by its answer length.
    """
    mask_id = _require_mask_id(model)
    b, length = x0.shape
    if t is None:
        t = sample_times(b, generator, eps, device=x0.device)
    maskable = None if prompt_mask is None else ~prompt_mask
    xt, masked = mask_tokens(x0, t, mask_id, maskable, generator)
    # Logits at the masked positions only: the others carry no loss, and the head is the widest matrix.
    logits = model(xt, logits_index=masked)
    nll = torch.zeros(x0.shape, dtype=logits.dtype, device=x0.device)
    nll[masked] = masked_nll_flat(logits, x0[masked], mask_id)
    per_seq = nll.sum(dim=1) / t
    if prompt_mask is None:
        return LossOutput(per_seq.sum() / (b * length), per_seq.detach().sum(), b * length)
    answer_len = maskable.sum(dim=1).clamp(min=1)
    return LossOutput((per_seq / answer_len).mean(), per_seq.detach().sum(), int(maskable.sum()))


def block_diffusion_mask(length: int, block_size: int, device: torch.device | str) -> Tensor:
    """Attention over [x_t ; x0] (2L keys) for BD3-LM training, shape [1, 1, 2L, 2L].

    Noisy tokens see their own noisy block and the clean blocks before it; clean tokens see
    clean blocks block-causally. Block b's prediction thus conditions on clean blocks < b only,
    exactly as at inference with an exact block cache.
    """
    block = torch.arange(length, device=device) // block_size
    same = block[:, None] == block[None, :]
    before = block[None, :] < block[:, None]
    upto = block[None, :] <= block[:, None]
    never = torch.zeros_like(same)
    top = torch.cat([same, before], dim=1)
    bottom = torch.cat([never, upto], dim=1)
    return torch.cat([top, bottom], dim=0)[None, None]


def block_diffusion_loss(
    model: Transformer,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    eps: float = DEFAULT_EPS,
) -> LossOutput:
    """Block-diffusion ELBO: each block is noised with its own t and denoised given clean earlier blocks.

    ``t`` (optional) has shape [B, n_blocks]. The sum of the per-block bounds over the sequence,
    divided by L, bounds the per-token NLL.
    """
    mask_id = _require_mask_id(model)
    b, length = x0.shape
    bs = model.config.block_size
    n_blocks = -(-length // bs)
    if t is None:
        t = sample_times(b * n_blocks, generator, eps, device=x0.device).view(b, n_blocks)
    t_tok = t.repeat_interleave(bs, dim=1)[:, :length]
    xt, masked = mask_tokens(x0, t_tok, mask_id, None, generator)
    positions = torch.arange(length, device=x0.device).repeat(2).expand(b, -1)
    attn = block_diffusion_mask(length, bs, x0.device)
    logits = model(torch.cat([xt, x0], dim=1), positions, attn_mask=attn, logits_index=slice(0, length))
    nll = masked_token_nll(logits, x0, masked, mask_id) / t_tok
    per_seq = nll.sum(dim=1)
    return LossOutput(per_seq.sum() / (b * length), per_seq.detach().sum(), b * length)


def ar_loss(model: Transformer, x0: Tensor, *, prompt_mask: Tensor | None = None) -> LossOutput:
    """Next-token cross-entropy of a causal model.

    With ``prompt_mask`` (SFT) only answer tokens are targets, and the loss is the mean over
    sequences of each one's answer NLL divided by its answer length (DESIGN's SFT rule)."""
    if not model.config.shifted:
        raise ValueError("the AR objective expects a shifted model (logit i predicts token i + 1)")
    logits = model(x0[:, :-1])
    target = x0[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
    counted = torch.ones_like(target, dtype=torch.bool) if prompt_mask is None else ~prompt_mask[:, 1:]
    nll = torch.where(counted, nll, torch.zeros_like(nll))
    n = int(counted.sum())
    if prompt_mask is None:
        return LossOutput(nll.sum() / max(n, 1), nll.detach().sum(), n)
    per_seq = nll.sum(dim=1) / counted.sum(dim=1).clamp(min=1)
    return LossOutput(per_seq.mean(), nll.detach().sum(), n)


def compute_loss(
    objective: str,
    model: Transformer,
    x0: Tensor,
    *,
    prompt_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Dispatch by objective name: diffusion, sft, block, ar."""
    if objective == "diffusion":
        return diffusion_loss(model, x0, generator=generator)
    if objective == "sft":
        if prompt_mask is None:
            raise ValueError("the sft objective needs a prompt mask")
        return diffusion_loss(model, x0, prompt_mask=prompt_mask, generator=generator)
    if objective == "block":
        return block_diffusion_loss(model, x0, generator=generator)
    if objective == "ar":
        return ar_loss(model, x0, prompt_mask=prompt_mask)
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
