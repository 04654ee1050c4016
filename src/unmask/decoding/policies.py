"""Commit policies: which of a block's masked positions get their prediction committed this step.

A policy sees one row's candidates (the masked positions of its current block) and answers
with a boolean mask over them. Most policies rank candidates by a score computed from the
predictions and commit the top n, where only n differs between them. Adding a policy is adding
a class and a ``POLICIES`` entry; a policy with a parameter names the ``GenerationConfig`` field
it reads (``parameter``), and gets that field and its setting entry (``decoding.settings``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from unmask.decoding.sampling import Predictions


@dataclass(frozen=True)
class StepPlan:
    """What the step schedule says about one row's current step."""

    masked: int  # masked candidates left in the block
    quota: int  # tokens the block's even schedule assigns to this step
    steps_left: int  # steps left in the block's budget, this one included

    @property
    def floor(self) -> int:
        """Fewest commits that still finish the block within its step budget."""
        return -(-self.masked // max(self.steps_left, 1))


def top_n(scores: Tensor, n: int) -> Tensor:
    """Boolean mask of the n highest scores; ties go to the earlier position."""
    order = torch.sort(scores, descending=True, stable=True).indices
    chosen = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    chosen[order[: max(0, min(n, scores.shape[0]))]] = True
    return chosen


class Policy(ABC):
    """Ranks candidates by ``score`` and commits the top ``count``."""

    name: ClassVar[str]
    uses_predictions: ClassVar[bool] = True  # False: choose positions first, predict only those
    parameter: ClassVar[str | None] = None  # the GenerationConfig field this policy reads, if any

    @classmethod
    def from_config(cls, config: Any) -> "Policy":
        return cls() if cls.parameter is None else cls(getattr(config, cls.parameter))  # type: ignore[call-arg]

    def score(self, pred: Predictions) -> Tensor:
        """Per-candidate score [M]; higher commits first."""
        return pred.confidence

    @abstractmethod
    def count(self, sorted_scores: Tensor, plan: StepPlan) -> int:
        """How many of the best candidates to commit, given their scores in descending order."""

    def select(self, scores: Tensor | None, plan: StepPlan, generator: torch.Generator | None) -> Tensor:
        assert scores is not None
        n = self.count(torch.sort(scores, descending=True).values, plan)
        return top_n(scores, max(1, n))


class ConfidencePolicy(Policy):
    """LLaDA low-confidence remasking: commit the scheduled number of most probable predictions."""

    name = "confidence"

    def count(self, sorted_scores: Tensor, plan: StepPlan) -> int:
        return plan.quota


class MarginPolicy(ConfidencePolicy):
    """Rank by the gap between the two most probable tokens (Dream's topk_margin)."""

    name = "margin"

    def score(self, pred: Predictions) -> Tensor:
        return pred.margin


class EntropyPolicy(ConfidencePolicy):
    """Rank by lowest entropy of the predictive distribution (Dream's entropy)."""

    name = "entropy"

    def score(self, pred: Predictions) -> Tensor:
        return pred.neg_entropy


class ThresholdPolicy(Policy):
    """Fast-dLLM: commit every prediction with probability >= tau, and at least the best one."""

    name = "threshold"
    parameter = "threshold"

    def __init__(self, tau: float = 0.9) -> None:
        self.tau = tau

    def count(self, sorted_scores: Tensor, plan: StepPlan) -> int:
        return max(int((sorted_scores >= self.tau).sum()), 1, plan.floor)


class FactorPolicy(Policy):
    """Fast-dLLM: with c1 >= c2 >= ..., commit the largest n such that (n + 1) * (1 - c_n) < f."""

    name = "factor"
    parameter = "factor"

    def __init__(self, factor: float = 1.0) -> None:
        self.factor = factor

    def count(self, sorted_scores: Tensor, plan: StepPlan) -> int:
        n = torch.arange(1, sorted_scores.shape[0] + 1, device=sorted_scores.device)
        ok = ((n + 1) * (1 - sorted_scores.double()) < self.factor).nonzero()
        largest = int(ok[-1]) + 1 if ok.numel() else 0
        return max(largest, 1, plan.floor)


class RandomPolicy(Policy):
    """The exact ancestral reverse process of masked diffusion.

    Going from time t to s < t, each masked token is revealed with probability (t - s) / t,
    which is 1/j when j equally spaced steps remain; the last step reveals all. When the number
    of steps is left open (``steps=None``), exactly one uniformly chosen position is revealed per
    step: the continuous-time process, where no two tokens are revealed at the same instant.
    """

    name = "random"
    uses_predictions = False

    def __init__(self, one_per_step: bool = False) -> None:
        self.one_per_step = one_per_step

    @classmethod
    def from_config(cls, config: Any) -> "Policy":
        return cls(one_per_step=config.steps is None)

    def count(self, sorted_scores: Tensor, plan: StepPlan) -> int:
        return 1

    def select(self, scores: Tensor | None, plan: StepPlan, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(plan.masked, generator=generator, dtype=torch.float64)
        if self.one_per_step:
            return top_n(u, 1)
        if plan.steps_left <= 1:
            return torch.ones(plan.masked, dtype=torch.bool)
        return u < 1.0 / plan.steps_left


class RandomCountPolicy(RandomPolicy):
    """The scheduled number of positions per step, chosen uniformly at random."""

    name = "random_count"

    def select(self, scores: Tensor | None, plan: StepPlan, generator: torch.Generator | None) -> Tensor:
        u = torch.rand(plan.masked, generator=generator, dtype=torch.float64)
        return top_n(u, plan.quota)


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RandomPolicy,
        RandomCountPolicy,
        ConfidencePolicy,
        MarginPolicy,
        EntropyPolicy,
        ThresholdPolicy,
        FactorPolicy,
    )
}


def make_policy(config: Any) -> Policy:
    """The policy named by ``config.policy``, with its parameters taken from ``config``."""
    return POLICIES[config.policy].from_config(config)
