"""Masked-diffusion decoding: a canvas of ``[MASK]`` tokens filled in block by block, step by step.

Canvas = prompt + N masks (+ suffix when infilling), prompts left-padded across the batch. Blocks
of the generated region are finished one after another (semi-autoregressive); inside a block
every step runs the model once, predicts each masked position and lets a policy pick which
predictions to commit. The step itself is ``unmask.decoding.step.DiffusionBatch.step``, shared
with the engine and the static-shape fast path; this module is the loop around it for one batch
of prompts. The model call is a swappable ``LogitsFn`` so that caches can replace the
full-canvas forward.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import nn

from unmask.decoding.caches import block_cache
from unmask.decoding.canvas import (
    Canvas,
    GenerationResult,
    LogitsFn,
    StepEvent,
    check_inputs,
    end_ids,
    finish,
    full_forward,
    result,
    row_generators,
)
from unmask.decoding.config import GenerationConfig
from unmask.decoding.healing import Healing
from unmask.decoding.policies import make_policy
from unmask.decoding.step import DiffusionBatch, make_row
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode


def forward_for(model: nn.Module, config: GenerationConfig) -> Callable[[Canvas], LogitsFn]:
    """What ``config.cache`` asks for, made afresh for each canvas."""
    if config.cache == "none":
        return lambda canvas: full_forward(model)
    return lambda canvas: block_cache(model, config.cache, config.cache_refresh)


def _decode(
    model: nn.Module,
    left: list[list[int]],
    right: list[list[int]] | None,
    config: GenerationConfig,
    seeds: list[int] | None,
    on_step: Callable[[StepEvent], None] | None,
    forward: LogitsFn | None,
    heal: Sequence[Healing | None] | None = None,
) -> GenerationResult:
    started = time.perf_counter()
    check_inputs(model, left, config, suffixes=right, heal=heal)
    if model.config.attention == AttentionMode.CAUSAL:
        raise UnmaskError("diffusion decoding needs a diffusion model; this one is autoregressive")
    rights = right if right is not None else [[] for _ in left]
    make_forward = forward_for(model, config) if forward is None else (lambda canvas: forward)
    batch = DiffusionBatch(model, make_forward)
    policy = make_policy(config)
    gens = row_generators(len(left), config, seeds)
    heals = heal if heal is not None else [None] * len(left)
    rows = [
        batch.add(make_row(model, p, config, g, suffix=s, heal=h, policy=policy))
        for p, s, g, h in zip(left, rights, gens, heals)
    ]
    step, trace = 0, [] if config.trace else None
    with torch.no_grad():
        while not batch.done:
            committed = batch.step()
            region = batch.canvas.region  # type: ignore[union-attr]
            if trace is not None:
                trace.append(region.cpu().clone())
            if on_step is not None:
                done = torch.tensor([row.done for row in rows])
                on_step(StepEvent(step, batch.nfe, region.clone(), committed, done, batch.mask_id))
            step += 1
    sequences, reasons = finish([batch.region(row) for row in rows], end_ids(model.config, config), config.stop_at_eos)
    return result(sequences, reasons, batch.nfe, [row.steps for row in rows], trace, started)


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    seeds: list[int] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    forward: LogitsFn | None = None,
    heal: Sequence[Healing | None] | None = None,
) -> GenerationResult:
    """Write ``config.max_new_tokens`` tokens after each prompt by masked-diffusion denoising.

    ``heal``: per prompt, a token-healing constraint on the first generated tokens (or None).
    """
    return _decode(model, [list(p) for p in prompts], None, config, seeds, on_step, forward, heal)


def infill(
    model: nn.Module,
    prefixes: list[list[int]],
    suffixes: list[list[int]],
    config: GenerationConfig,
    *,
    seeds: list[int] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    forward: LogitsFn | None = None,
    heal: Sequence[Healing | None] | None = None,
) -> GenerationResult:
    """Fill ``config.max_new_tokens`` masks between each prefix and suffix; only the middle is written.

    The model may end the middle early with EOS/pad; those are stripped from the result. ``heal``:
    per prefix, a token-healing constraint on the middle's first tokens (or None).
    """
    if model.config.attention != AttentionMode.BIDIRECTIONAL:
        kind = "autoregressive" if model.config.attention == AttentionMode.CAUSAL else model.config.attention
        raise UnmaskError(f"fill-in-the-middle needs a bidirectional model, this one is {kind}")
    return _decode(model, [list(p) for p in prefixes], [list(s) for s in suffixes], config, seeds, on_step, forward, heal)
