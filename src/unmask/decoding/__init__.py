"""Decoding on token ids: masked-diffusion block/step loop, commit policies, AR decoding.

``decode`` picks the right loop for a model: AR for causal models, diffusion otherwise.
"""

from __future__ import annotations

from typing import Callable

from collections.abc import Sequence

from torch import nn

from unmask.decoding.ar import ARBatch, ar_generate
from unmask.decoding.caches import CACHES
from unmask.decoding.canvas import Canvas, GenerationResult, LogitsFn, StepEvent, full_forward
from unmask.decoding.config import GenerationConfig
from unmask.decoding.generate import generate, infill
from unmask.decoding.healing import Healing, completion_text, heal, heal_batch
from unmask.decoding.policies import POLICIES, Policy, StepPlan, make_policy
from unmask.decoding.sampling import Predictions, filter_logits, predict
from unmask.decoding.step import DiffusionBatch
from unmask.models.config import AttentionMode

__all__ = [
    "ARBatch",
    "CACHES",
    "Canvas",
    "DiffusionBatch",
    "GenerationConfig",
    "GenerationResult",
    "Healing",
    "LogitsFn",
    "POLICIES",
    "Policy",
    "Predictions",
    "StepEvent",
    "StepPlan",
    "ar_generate",
    "completion_text",
    "decode",
    "filter_logits",
    "full_forward",
    "generate",
    "heal",
    "heal_batch",
    "infill",
    "make_policy",
    "predict",
]


def decode(
    model: nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    seeds: list[int] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    heal: Sequence[Healing | None] | None = None,
) -> GenerationResult:
    """AR decoding for causal models, masked-diffusion decoding for bidirectional and block-causal ones.

    ``heal``: per prompt, a token-healing constraint (``unmask.decoding.healing``) or None.
    """
    if model.config.attention == AttentionMode.CAUSAL:
        return ar_generate(model, prompts, config, seeds=seeds, on_step=on_step, heal=heal)
    return generate(model, prompts, config, seeds=seeds, on_step=on_step, heal=heal)
