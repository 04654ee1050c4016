"""Block KV caches for diffusion decoding: what each step recomputes, and what it reuses.

A bidirectional model has no exact cache: every token attends to every other, so a commit
changes the keys and values of the whole canvas. The approximate block cache (Fast-dLLM) runs
the full canvas at the start of each block, keeps every position's keys and values, and during
the block's steps recomputes only
- ``prefix``: the block and everything after it (the prompt and finished blocks are reused), or
- ``dual``: the block alone (the masked suffix's keys and values are reused too),
optionally running the full canvas again every ``refresh`` steps (``refresh=1`` is exact).

A block-causal model has an exact cache: a finished block never sees later ones, so its keys and
values are final once it is finished; each step recomputes only the running block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from unmask.decoding.canvas import Canvas
from unmask.models.config import AttentionMode
from unmask.models.transformer import KVCache

CACHES = ("none", "prefix", "dual")


class BlockCache:
    """A ``LogitsFn`` that keeps a KV cache across the steps of one decoding call."""

    def __init__(self, model: nn.Module, mode: str, refresh: int | None = None) -> None:
        if mode not in ("prefix", "dual"):
            raise ValueError(f"unknown block cache mode {mode!r}")
        self.model, self.mode, self.refresh = model, mode, refresh
        self.exact = model.config.attention == AttentionMode.BLOCK
        self.shift = 1 if model.config.shifted else 0
        self.cache: KVCache | None = None
        self.block: int | None = None  # span start of the block the cache was last brought up to date for
        self.begin = 0  # exact mode: first slot the last step recomputed
        self.since = 0  # approximate modes: steps since the last full pass, that pass included
        self.full_passes = 0  # full-canvas passes run (refreshes), for reports and tests

    def __call__(self, canvas: Canvas, rows: Tensor | None, window: slice, span: slice) -> Tensor:
        ids, positions = canvas.ids, canvas.positions
        valid = canvas.valid if canvas.valid is not None else torch.ones_like(ids, dtype=torch.bool)
        batch, width = ids.shape
        if self.cache is None or self.cache.capacity < width or self.cache.positions.shape[0] != batch:
            param = next(self.model.parameters())
            self.cache = KVCache.allocate(self.model.config, batch, width, dtype=param.dtype, device=param.device)
            self.block = None
        start = max(span.start - self.shift, 0)
        if self.exact:
            begin, end = start, span.stop
            if self.block != span.start:  # a new block: the last one's final tokens must be written once more
                begin = min(self.begin, start) if self.block is not None else 0
                self.block = span.start
            self.cache.truncate(begin)
            self.begin = start
        elif self.block != span.start or (self.refresh is not None and self.since >= self.refresh):
            begin, end = 0, width
            self.cache.truncate(0)
            self.block, self.since = span.start, 0
            self.full_passes += 1
        else:
            begin, end = start, span.stop if self.mode == "dual" else width
        if not self.exact:
            self.since += 1
        logits = self.model(
            ids[:, begin:end],
            positions[:, begin:end],
            valid[:, begin:end],
            cache=self.cache,
            cache_start=begin,
            logits_index=slice(window.start - begin, window.stop - begin),
        )
        return logits if rows is None else logits[rows]


def block_cache(model: nn.Module, mode: str, refresh: int | None = None) -> Callable[..., Tensor]:
    """The block cache for ``model``: approximate for bidirectional models, exact for block-causal ones."""
    return BlockCache(model, mode, refresh)
