"""Turning logits into token predictions: filtering, temperature, Gumbel-max sampling.

Every row of a batch owns a CPU ``torch.Generator``; its Gumbel noise is drawn in float64 only
for that row's positions, so a row's random stream never depends on the batch it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unmask.decoding.healing import Slots, restrict


def filter_logits(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    mask_id: int | None = None,
) -> Tensor:
    """Float32 logits [M, V] with ``[MASK]`` removed, divided by the temperature, top-k/top-p filtered.

    Removed tokens get -inf. Temperature 0 (greedy) leaves the scale at 1 so the softmax of the
    result still gives meaningful confidences.
    """
    logits = logits.float().clone()
    if mask_id is not None:
        logits[..., mask_id] = float("-inf")
    if temperature > 0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def gumbel_noise(generator: torch.Generator | None, n: int, vocab: int) -> Tensor:
    """Standard Gumbel noise [n, vocab] in float64 from ``generator`` (a CPU generator)."""
    u = torch.rand((n, vocab), generator=generator, dtype=torch.float64)
    return -torch.log(-torch.log(u))


@dataclass
class Predictions:
    """One predicted token per candidate position, with the distribution it came from."""

    tokens: Tensor  # [M] chosen token ids
    logprobs: Tensor  # [M, V] log-softmax of the filtered, tempered logits

    @property
    def probs(self) -> Tensor:
        return self.logprobs.exp()

    @property
    def confidence(self) -> Tensor:
        """Probability of the chosen token, [M]."""
        return self.logprobs.gather(-1, self.tokens[:, None]).squeeze(-1).exp()

    @property
    def margin(self) -> Tensor:
        """Top-1 minus top-2 probability, [M]."""
        if self.logprobs.shape[-1] < 2:
            return self.probs[:, 0]
        top2 = torch.topk(self.probs, 2, dim=-1).values
        return top2[:, 0] - top2[:, 1]

    @property
    def neg_entropy(self) -> Tensor:
        """Minus the entropy (nats) of each distribution, [M]: higher means more certain."""
        p = self.probs
        return torch.where(p > 0, p * self.logprobs, torch.zeros_like(p)).sum(-1)


def predict(
    logits: Tensor,
    counts: list[int],
    generators: list[torch.Generator | None],
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    mask_id: int | None = None,
    healing: Sequence[Slots | None] | None = None,
) -> Predictions:
    """Predictions for logits [M, V] that stack ``counts[r]`` consecutive positions of row r.

    Greedy (argmax) at temperature 0; otherwise Gumbel-max, which samples exactly from the
    filtered, tempered softmax, with each row's noise drawn from ``generators[r]``. ``healing``:
    per row, the token-healing constraint on its positions (see ``unmask.decoding.healing``);
    a constrained position samples from the softmax restricted to its allowed tokens.
    """
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, mask_id=mask_id)
    noise = None
    if temperature > 0 and filtered.shape[0] > 0:
        vocab = filtered.shape[-1]
        noise = torch.cat([gumbel_noise(g, n, vocab) for g, n in zip(generators, counts) if n]).to(filtered.device)
    picked: dict[int, int] = {}
    if healing is not None:

        def pick(k: int) -> int:
            row = filtered[k]
            score = row if noise is None else torch.log_softmax(row, dim=-1).double() + noise[k]
            picked[k] = int(score.argmax())
            return picked[k]

        restrict(filtered, healing, pick)
    logprobs = torch.log_softmax(filtered, dim=-1)
    if noise is None:
        tokens = filtered.argmax(dim=-1)
    else:
        tokens = (logprobs.double() + noise).argmax(dim=-1)
    for k, token in picked.items():  # the very picks later positions were constrained on
        tokens[k] = token
    return Predictions(tokens, logprobs)
