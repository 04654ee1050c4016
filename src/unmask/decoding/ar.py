"""Autoregressive decoding of causal models: one token per forward call with a KV cache.

Same configuration, sampling, seeds, results and step events as diffusion decoding, so AR
checkpoints and AR twins of diffusion models can be compared on equal terms. ``ARBatch`` is the
one AR step, shared by ``ar_generate`` and the engine: rows join (their prompts are prefilled
together) and leave between steps, and every running row's next token goes through one forward
call over one KV cache.

The cache's slots need not follow the rows' positions: attention is masked by each slot's stored
position and validity, so every row writes step k's token into the same column, and a row that
joins is placed so that its prompt ends where the others' next token goes. Rows that leave are
dropped from the cache, with the columns no remaining row uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from unmask.decoding.canvas import (
    GenerationResult,
    StepEvent,
    check_inputs,
    end_ids,
    finish,
    model_device,
    pad_batch,
    pad_id,
    result,
    row_generators,
)
from unmask.decoding.config import GenerationConfig
from unmask.decoding.healing import UNDECIDED, Healing
from unmask.decoding.sampling import predict
from unmask.decoding.step import heal_slots
from unmask.errors import UnmaskError
from unmask.models.transformer import KVCache

BUCKET = 64  # cache columns are allocated in multiples of this


@dataclass(eq=False)
class ARRow:
    """One sequence being continued token by token."""

    prompt: list[int]
    config: GenerationConfig
    generator: torch.Generator
    ends: list[int]  # tokens that end the row (empty: it runs to max_new_tokens)
    heal: Healing | None = None
    out: list[int] = field(default_factory=list)
    done: bool = False
    first: int = 0  # the cache column of the row's first prompt token

    @property
    def length(self) -> int:
        return self.config.max_new_tokens

    def region(self, undecided: int) -> list[int]:
        """The generated tokens, an early end's token repeated to the end, ``undecided`` after."""
        last = self.out[-1] if self.out else undecided
        ended = self.config.stop_at_eos and bool(self.out) and last in self.ends
        return self.out + [last if ended else undecided] * (self.length - len(self.out))


def pick_tokens(logits: Tensor, rows: Sequence[ARRow], mask_id: int | None) -> Tensor:
    """Each row's next token from its logits [A, V]: greedy or sampled from its own stream, never
    ``[MASK]``, and constrained by token healing while the row's first tokens are being written."""
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    groups: dict[int, list[int]] = {}
    for a, row in enumerate(rows):
        groups.setdefault(id(row.config), []).append(a)
    for members in groups.values():
        group = [rows[a] for a in members]
        config = group[0].config
        slots = None
        if any(row.heal is not None for row in group):
            regions = torch.tensor([row.region(UNDECIDED) for row in group])
            at = [torch.tensor([len(row.out)]) for row in group]
            slots = heal_slots([row.heal for row in group], regions, at, UNDECIDED)
        pred = predict(
            logits[members], [1] * len(group), [row.generator for row in group],
            temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, mask_id=mask_id, healing=slots,
        )
        tokens[members] = pred.tokens
    return tokens


def _columns(cache: KVCache, rows: Tensor, start: int, stop: int, into: KVCache, at: int, slot: int) -> None:
    """Copy columns [start, stop) of ``rows`` of ``cache`` into ``into`` at rows [slot, ...) and column ``at``."""
    n, width = rows.numel(), stop - start
    for src, dst in zip([*cache.keys, *cache.values], [*into.keys, *into.values]):
        dst[slot : slot + n, :, at : at + width] = src[rows, :, start:stop]
    into.positions[slot : slot + n, at : at + width] = cache.positions[rows, start:stop]
    into.valid[slot : slot + n, at : at + width] = cache.valid[rows, start:stop]


class ARBatch:
    """Rows decoded together; see the module docstring."""

    def __init__(self, model: nn.Module) -> None:
        if not model.config.shifted:
            raise UnmaskError("AR decoding needs a shifted model (logit i predicts token i + 1)")
        self.model, self.mc = model, model.config
        self.device, self.pad = model_device(model), pad_id(self.mc)
        self.dtype = next(model.parameters()).dtype
        self.undecided = self.mc.mask_token_id if self.mc.mask_token_id is not None else -1
        self.rows: list[ARRow] = []  # in the cache, in its row order
        self.waiting: list[ARRow] = []  # added, not prefilled yet
        self.cache: KVCache | None = None
        self.column = 0  # where the next token of every cached row goes
        self.nfe = 0

    def add(self, row: ARRow) -> ARRow:
        self.waiting.append(row)
        return row

    def remove(self, row: ARRow) -> None:
        if row in self.waiting:
            self.waiting.remove(row)
            return
        if row not in self.rows:  # it ended and left at a step
            return
        keep = [r for r, other in enumerate(self.rows) if other is not row]
        self.rows = [self.rows[r] for r in keep]
        self._repack(keep)

    @property
    def done(self) -> bool:
        return not self.waiting and all(row.done for row in self.rows)

    def step(self) -> list[ARRow]:
        """One forward call for the cached rows (their last tokens) and one for the rows that joined
        (their prompts); every one of them gets its next token. Returns the rows that got one."""
        ready = [row for row in self.rows if not row.done]
        if len(ready) < len(self.rows):  # rows that ended since the last step leave the cache
            keep = [r for r, row in enumerate(self.rows) if not row.done]
            self.rows = ready
            self._repack(keep)
        logits = []
        if ready:
            tokens = torch.tensor([[row.out[-1]] for row in ready], device=self.device)
            positions = torch.tensor([[len(row.prompt) + len(row.out) - 1] for row in ready], device=self.device)
            ones = torch.ones(len(ready), 1, dtype=torch.bool, device=self.device)
            assert self.cache is not None
            logits.append(self.model(tokens, positions, ones, cache=self.cache, cache_start=self.column)[:, -1])
            self.column += 1
            self.nfe += 1
        joined = self.waiting
        if joined:
            self.waiting = []
            logits.append(self._prefill(joined))
        stepped = ready + joined
        if not stepped:
            return []
        picked = pick_tokens(torch.cat(logits), stepped, self.mc.mask_token_id).tolist()
        for row, token in zip(stepped, picked):
            row.out.append(token)
            row.done = (row.config.stop_at_eos and token in row.ends) or len(row.out) == row.length
        return stepped

    def _prefill(self, joined: list[ARRow]) -> Tensor:
        """Run the joining rows' prompts (left-padded together) into a cache of their own, then merge it
        with the running one so that every row's next token goes to one column."""
        canvas = pad_batch([row.prompt for row in joined], 0, self.pad, [[] for _ in joined], self.pad, self.device)
        width = canvas.ids.shape[1]
        fresh = KVCache.allocate(self.mc, len(joined), width, dtype=self.dtype, device=self.device)
        valid = canvas.valid if canvas.valid is not None else torch.ones_like(canvas.ids, dtype=torch.bool)
        logits = self.model(canvas.ids, canvas.positions, valid, cache=fresh, logits_index=slice(width - 1, width))[:, 0]
        self.nfe += 1
        column = max(self.column, width)
        left = column - self.column  # the running rows' columns move right by this
        room = max([row.length - len(row.out) for row in self.rows] + [row.length for row in joined])
        capacity = -(-(column + room) // BUCKET) * BUCKET
        merged = KVCache.allocate(self.mc, len(self.rows) + len(joined), capacity, dtype=self.dtype, device=self.device)
        if self.cache is not None and self.rows:
            _columns(self.cache, torch.arange(len(self.rows), device=self.device), 0, self.column, merged, left, 0)
        _columns(fresh, torch.arange(len(joined), device=self.device), 0, width, merged, column - width, len(self.rows))
        for row in self.rows:
            row.first += left
        for row, ids in zip(joined, valid.tolist()):
            row.first = column - width + ids.index(True)
        merged.length = column
        self.cache, self.column = merged, column
        self.rows = self.rows + joined
        return logits

    def _repack(self, keep: list[int]) -> None:
        """Keep cache rows ``keep`` and drop the leading columns none of them uses."""
        if self.cache is None:
            return
        if not keep:
            self.cache, self.column = None, 0
            return
        first = min(row.first for row in self.rows)
        packed = KVCache.allocate(self.mc, len(keep), self.cache.capacity - first, dtype=self.dtype, device=self.device)
        _columns(self.cache, torch.tensor(keep, device=self.device), first, self.column, packed, 0, 0)
        for row in self.rows:
            row.first -= first
        self.column -= first
        packed.length = self.column
        self.cache = packed


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
    check_inputs(model, prompts, config, heal=heal)
    batch = ARBatch(model)
    ends = end_ids(model.config, config)
    heals = heal if heal is not None else [None] * len(prompts)
    rows = [
        batch.add(ARRow(list(p), config, g, ends, h))
        for p, g, h in zip(prompts, row_generators(len(prompts), config, seeds), heals)
    ]
    trace = [] if config.trace else None
    step = 0
    with torch.no_grad():
        while not batch.done:
            stepped = batch.step()
            if trace is None and on_step is None:
                continue
            out = torch.tensor([row.region(batch.undecided) for row in rows])
            if trace is not None:
                trace.append(out.clone())
            if on_step is not None:
                committed = torch.zeros(out.shape, dtype=torch.bool)
                for r, row in enumerate(rows):
                    if row in stepped:  # the new token, and an early end's fill
                        committed[r, len(row.out) - 1 : None if row.done else len(row.out)] = True
                on_step(StepEvent(step, batch.nfe, out, committed, torch.tensor([row.done for row in rows]), batch.undecided))
            step += 1
    sequences, reasons = finish([row.region(batch.undecided) for row in rows], ends, config.stop_at_eos)
    return result(sequences, reasons, batch.nfe, [len(row.out) for row in rows], trace, started)
