"""The linear masking schedule and the sampling of diffusion times.

Forward process: each token of x0 is replaced by [MASK] independently with probability t
(alpha_t = 1 - t). The ELBO weight of a masked token at time t is -alpha_t' / (1 - alpha_t) = 1/t.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_EPS = 1e-3


def sample_times(
    n: int, generator: torch.Generator | None = None, eps: float = DEFAULT_EPS, device: torch.device | str = "cpu"
) -> Tensor:
    """n low-discrepancy times in [eps, 1]: t_b = (u + b/n) mod 1, then mapped affinely onto [eps, 1].

    One uniform draw stratified over n evenly spaced offsets: marginally each t_b is uniform,
    but the batch covers [0, 1) evenly, which cuts the variance of the loss estimate.
    """
    u = torch.rand((), generator=generator, dtype=torch.float64)
    t = (u + torch.arange(n, dtype=torch.float64) / n) % 1.0
    return (eps + (1.0 - eps) * t).to(device=device, dtype=torch.float32)


def mask_tokens(
    x0: Tensor, t: Tensor, mask_id: int, maskable: Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """x_t: each maskable token of x0 becomes ``mask_id`` with probability t (per row).

    t broadcasts against x0 from the left ([B] or [B, L]). Returns (x_t, masked).
    """
    while t.dim() < x0.dim():
        t = t[..., None]
    u = torch.rand(x0.shape, generator=generator, device="cpu").to(x0.device)
    masked = u < t
    if maskable is not None:
        masked &= maskable
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked
