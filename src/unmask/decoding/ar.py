"""Autoregressive decoding of causal models: one token per forward call with a per-token KV cache.

Same configuration, sampling, seeds, results and step events as diffusion decoding, so AR
checkpoints and AR twins of diffusion models can be compared on equal terms.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import nn

from unmask.decoding.generate import (
    GenerationConfig,
    GenerationResult,
    StepEvent,
    check_heal,
    check_prompts,
    end_ids,
    finish,
    model_device,
    pad_batch,
    heal_slots,
    pad_id,
    result,
    row_generators,
)
from unmask.decoding.healing import Healing
from unmask.decoding.sampling import predict
from unmask.errors import UnmaskError
from unmask.models.transformer import KVCache


def ar_generate(
    model: nn.Module,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    seeds: list[int] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    heal: Sequence[Healing | None] | None = None,
) -> GenerationResult:
    """Continue each prompt token by token; ``nfe`` counts the prefill and every decode call.

    ``heal``: per prompt, a token-healing constraint on the first generated tokens (or None).
    """
    started = time.perf_counter()
    config.validate()
    mc = model.config
    if not mc.shifted:
        raise UnmaskError("AR decoding needs a shifted model (logit i predicts token i + 1)")
    prompts = [list(p) for p in prompts]
    n, b = config.max_new_tokens, len(prompts)
    check_prompts(model, prompts, [n] * b)
    check_heal(heal, b)
    if any(len(p) == 0 for p in prompts):
        raise UnmaskError("AR decoding needs a non-empty prompt (at least a BOS token)")
    gens = row_generators(b, config, seeds)
    device = model_device(model)
    pad = pad_id(mc)
    undecided = mc.mask_token_id if mc.mask_token_id is not None else -1
    canvas = pad_batch(prompts, 0, pad, [[] for _ in prompts], pad, device)
    width = canvas.ids.shape[1]
    valid = canvas.valid if canvas.valid is not None else torch.ones_like(canvas.ids, dtype=torch.bool)
    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(mc, b, width + n, dtype=dtype, device=device)
    ends = end_ids(mc, config)
    stop = config.stop_at_eos and bool(ends)

    out = torch.full((b, n), undecided, dtype=torch.long, device=device)
    done, steps = [False] * b, [0] * b
    trace = [] if config.trace else None
    next_pos = canvas.positions[:, -1:] + 1
    ones = torch.ones(b, 1, dtype=torch.bool, device=device)
    with torch.no_grad():
        logits = model(canvas.ids, canvas.positions, valid, cache=cache, logits_index=slice(width - 1, width))[:, 0]
        nfe = 1
        for i in range(n):
            active = [r for r in range(b) if not done[r]]
            slots = None
            if heal is not None:
                slots = heal_slots([heal[r] for r in active], out[active], [torch.tensor([i])] * len(active), undecided)
            pred = predict(
                logits[active],
                [1] * len(active),
                [gens[r] for r in active],
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                mask_id=mc.mask_token_id,
                healing=slots,
            )
            committed = torch.zeros(b, n, dtype=torch.bool, device=device)
            for r, token in zip(active, pred.tokens.tolist()):
                out[r, i] = token
                committed[r, i] = True
                steps[r] += 1
                if stop and token in ends:
                    out[r, i + 1 :] = token
                    committed[r, i + 1 :] = True
                    done[r] = True
                elif i == n - 1:
                    done[r] = True
            if trace is not None:
                trace.append(out.cpu().clone())
            if on_step is not None:
                on_step(StepEvent(i, nfe, out.clone(), committed, torch.tensor(done), undecided))
            if all(done):
                break
            feed = torch.where(out[:, i : i + 1] == undecided, pad, out[:, i : i + 1])
            logits = model(feed, next_pos, ones, cache=cache)[:, 0]
            nfe += 1
            next_pos = next_pos + 1

    sequences, reasons = finish(out.tolist(), ends, config.stop_at_eos)
    return result(sequences, reasons, nfe, steps, trace, started)
