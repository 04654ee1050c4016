"""The masking schedule: stratified diffusion times and the forward (masking) process."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from unmask.diffusion.schedule import DEFAULT_EPS, mask_tokens, sample_times


@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("eps", [DEFAULT_EPS, 0.2])
def test_sample_times_lie_in_range_one_per_stratum(n: int, eps: float) -> None:
    # Catches times outside [eps, 1] (a missing mod or affine map) and iid or clustered draws
    # (not one per stratum), which would lose the variance reduction.
    for seed in range(20):
        t = sample_times(n, torch.Generator().manual_seed(seed), eps=eps)
        assert t.shape == (n,) and t.dtype == torch.float32
        assert bool((t >= eps).all()) and bool((t <= 1.0).all())
        s = ((t.double() - eps) / (1.0 - eps)).sort().values  # back on [0, 1)
        k = torch.arange(n, dtype=torch.float64)
        tol = 1e-6  # float32 rounding of the returned times
        assert bool((s >= k / n - tol).all()) and bool((s < (k + 1) / n + tol).all())
        # One shared offset: every time is the first one plus a multiple of 1/n.
        steps = (s - s[0]) * n
        assert torch.allclose(steps, steps.round(), atol=1e-4)


@pytest.mark.parametrize("eps", [DEFAULT_EPS, 0.2])
def test_sample_times_marginally_uniform(eps: float) -> None:
    # Catches a non-uniform marginal at any batch index: e.g. clamping to eps instead of the affine
    # map (a point mass at eps), a squared draw, or strata that do not wrap around.
    n, draws = 5, 2000
    t = torch.stack([sample_times(n, torch.Generator().manual_seed(seed), eps=eps) for seed in range(draws)])
    for b in range(n):
        result = stats.kstest(t[:, b].double().numpy(), stats.uniform(loc=eps, scale=1.0 - eps).cdf)
        assert result.pvalue > 1e-3, (b, result)


def test_sample_times_reproducible_from_the_generator() -> None:
    # Catches draws that bypass the generator (training could not be replayed or compared).
    a = sample_times(8, torch.Generator().manual_seed(3))
    b = sample_times(8, torch.Generator().manual_seed(3))
    c = sample_times(8, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mask_tokens_masks_each_token_with_probability_t() -> None:
    # Catches a wrong masking rate (e.g. 1 - t), masks that ignore t's row, and tokens changed
    # other than into [MASK].
    rows, length, mask_id = 3000, 8, 9
    x0 = torch.randint(0, 9, (rows, length), generator=torch.Generator().manual_seed(0))
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    t = levels.repeat(rows // len(levels))
    xt, masked = mask_tokens(x0, t, mask_id, generator=torch.Generator().manual_seed(1))
    assert torch.equal(xt, torch.where(masked, torch.full_like(x0, mask_id), x0))
    for level in levels.tolist():
        rate = masked[t == level].float().mean().item()
        count = int((t == level).sum()) * length
        se = max((level * (1 - level) / count) ** 0.5, 1e-12)
        assert abs(rate - level) <= 5 * se, (level, rate)


def test_mask_tokens_never_masks_protected_positions_and_broadcasts_per_token_t() -> None:
    # Catches a maskable argument that is ignored, and per-token t ([B, L]) broadcast the wrong way.
    x0 = torch.arange(12).view(2, 6)
    maskable = torch.tensor([[False, False, True, True, True, True], [False, True, True, True, True, True]])
    t = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    xt, masked = mask_tokens(x0, t, 99, maskable, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([[False, False, True, False, False, False], [False, True, True, True, True, True]])
    assert torch.equal(masked, expected)
    assert torch.equal(xt[~masked], x0[~masked]) and bool((xt[masked] == 99).all())
