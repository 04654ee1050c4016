"""Masked-diffusion decoding: a canvas of ``[MASK]`` tokens filled in block by block, step by step.

Canvas = prompt + N masks (+ suffix when infilling), left-padded across the batch. Blocks of
the generated region are finished one after another (semi-autoregressive); inside a block every
step runs the model once, predicts each masked position and lets a policy pick which predictions
to commit. Works on token ids only. The per-step model call is a swappable ``LogitsFn`` so that
caching strategies can replace the full-canvas forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from unmask.decoding.caches import CACHES, block_cache
from unmask.decoding.healing import UNDECIDED, Healing, Slots
from unmask.decoding.policies import POLICIES, Policy, StepPlan, make_policy
from unmask.decoding.sampling import Predictions, predict
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig


@dataclass
class GenerationConfig:
    """How to decode; shared by diffusion and AR decoding."""

    max_new_tokens: int = 128  # canvas length N (for infill: the middle's length)
    block_size: int | None = 32  # semi-AR block; None or >= N = pure diffusion (one block)
    steps: int | None = None  # total denoising steps over the canvas; None = one token per step; threshold/factor: a cap
    policy: str = "confidence"  # random | random_count | confidence | margin | entropy | threshold | factor
    threshold: float = 0.9  # tau for `threshold`
    factor: float = 1.0  # f for `factor`
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 = sample from the tempered softmax
    top_k: int | None = None  # keep only the k most probable tokens before sampling
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    seed: int | None = None  # per-row seed; same seed -> same output alone or in a batch
    stop_at_eos: bool = True  # end a row once EOS is committed and everything before it is decided
    stop_ids: tuple[int, ...] = ()  # more tokens that end a row like EOS (a chat template's end-of-turn)
    trace: bool = False  # keep a copy of the canvas after every step
    cache: str = "none"  # none | prefix | dual: approximate block KV cache (bidirectional); block-causal models: exact
    cache_refresh: int | None = None  # approximate caches: also recompute everything every this many steps

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UnmaskError(f"invalid generation config: {msg}")

        need(self.policy in POLICIES, f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.block_size is None or self.block_size >= 1, f"block_size must be >= 1 or None, got {self.block_size}")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1 or None, got {self.steps}")
        need(0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}")
        need(self.factor > 0, f"factor must be > 0, got {self.factor}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or None, got {self.top_k}")
        need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.cache in CACHES, f"unknown cache {self.cache!r} (choose from {', '.join(CACHES)})")
        need(self.cache_refresh is None or self.cache_refresh >= 1, f"cache_refresh must be >= 1, got {self.cache_refresh}")
        self.stop_ids = tuple(int(i) for i in self.stop_ids)


@dataclass
class StepEvent:
    """Sent to ``on_step`` after every step (live views, streaming)."""

    step: int  # 0-based index of the step just taken
    nfe: int  # model forward calls so far
    canvas: Tensor  # [B, N] generated region; ``mask_id`` where still undecided
    committed: Tensor  # [B, N] bool: positions this step wrote
    done: Tensor  # [B] bool: rows that need no more steps
    mask_id: int  # the id marking undecided positions in ``canvas``


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # generated ids per row, without trailing EOS/pad/mask
    finish_reasons: list[str]  # "stop" when EOS ended the row, else "length"
    nfe: int  # model forward calls (a batched call counts once)
    steps: list[int]  # steps (forward calls taken part in) per row
    tokens_per_forward: float  # generated tokens per forward call of a row (= tokens / nfe at batch 1)
    trace: list[Tensor] | None = None  # [B, N] canvas after every step when config.trace
    elapsed: float = 0.0  # wall-clock seconds


@dataclass
class Canvas:
    """The token grid every step works on."""

    ids: Tensor  # [B, T] left padding, prompt/prefix, generated region, suffix, right padding
    positions: Tensor  # [B, T] position of each token in its own unpadded sequence
    valid: Tensor | None  # [B, T] False on padding; None when there is none
    start: int  # index of the generated region's first slot
    length: int  # N, the generated region's length

    @property
    def region(self) -> Tensor:
        return self.ids[:, self.start : self.start + self.length]


# (canvas, rows or None for all rows, window, span) -> logits [rows, window, V]. ``window``: the source
# positions whose logits the step needs; ``span``: the canvas slots whose tokens may still change
# in the running blocks (from the earliest running block's first slot to the latest one's end),
# which is what a block cache must recompute.
LogitsFn = Callable[[Canvas, "Tensor | None", slice, slice], Tensor]


def full_forward(model: nn.Module) -> LogitsFn:
    """Recompute the whole canvas every step (no cache)."""

    def forward(canvas: Canvas, rows: Tensor | None, window: slice, span: slice) -> Tensor:
        ids, positions, valid = canvas.ids, canvas.positions, canvas.valid
        if rows is not None:
            ids, positions = ids[rows], positions[rows]
            valid = None if valid is None else valid[rows]
        return model(ids, positions, valid, logits_index=window)

    return forward


# ---------------------------------------------------------------------------- shared helpers


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device(getattr(model, "device", "cpu"))


def pad_id(model_config: ModelConfig) -> int:
    """The id that fills padding slots: pad, else EOS, else 0 (padding is never attended to)."""
    return next((i for i in (model_config.pad_token_id, model_config.eos_token_id) if i is not None), 0)


def stop_tensor(ends: list[int], config: GenerationConfig, device: torch.device) -> Tensor | None:
    """``ends`` on the device for early stopping, or None when there is nothing to stop at."""
    return torch.tensor(ends, dtype=torch.long, device=device) if config.stop_at_eos and ends else None


def check_heal(heal: Sequence[Healing | None] | None, rows: int) -> None:
    if heal is not None and len(heal) != rows:
        raise UnmaskError(f"got {len(heal)} token-healing constraints for {rows} prompts")


def heal_slots(
    heals: Sequence[Healing | None] | None, regions: Tensor | None, positions: Sequence[Tensor], undecided: int
) -> list[Slots | None] | None:
    """Where each row's predictions sit in a flat logits tensor, for the rows that heal (else None)."""
    if heals is None or regions is None or all(h is None for h in heals):
        return None
    out: list[Slots | None] = []
    offset = 0
    for h, region, pos in zip(heals, regions, positions):
        if h is not None and pos.numel() and int(pos.min()) < len(h.removed):
            row = [UNDECIDED if t == undecided else t for t in region.tolist()]
            out.append(Slots(h, row, pos.tolist(), list(range(offset, offset + pos.numel()))))
        else:
            out.append(None)
        offset += pos.numel()
    return out


def end_ids(model_config: ModelConfig, config: GenerationConfig | None = None) -> list[int]:
    """Tokens that end a sequence: EOS, pad (which a model may use to close an infill), stop ids."""
    ids = {i for i in (model_config.eos_token_id, model_config.pad_token_id) if i is not None}
    return sorted(ids | set(config.stop_ids if config is not None else ()))


def row_generators(n: int, config: GenerationConfig, seeds: list[int] | None) -> list[torch.Generator]:
    """One CPU generator per row, seeded with ``seeds[r]``, else ``config.seed``, else a fresh seed."""
    if seeds is not None and len(seeds) != n:
        raise UnmaskError(f"got {len(seeds)} seeds for {n} prompts")
    gens = []
    for r in range(n):
        seed = seeds[r] if seeds is not None else config.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        gens.append(torch.Generator().manual_seed(int(seed)))
    return gens


def check_prompts(model: nn.Module, parts: list[list[int]], extra: list[int], what: str = "prompt") -> None:
    """Token ids inside the vocabulary, and each row's total length within ``max_seq_len``."""
    mc = model.config
    if not parts:
        raise UnmaskError(f"no {what}s given")
    for r, (ids, more) in enumerate(zip(parts, extra)):
        bad = [t for t in ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise UnmaskError(f"{what} {r}: token id {bad[0]} outside the vocabulary of size {mc.vocab_size}")
        if len(ids) + more > mc.max_seq_len:
            raise UnmaskError(
                f"{what} {r}: {len(ids)} tokens + {more} to write exceed the model's context of "
                f"{mc.max_seq_len} tokens (max_seq_len)"
            )


def pad_batch(
    left: list[list[int]], middle: int, fill: int, right: list[list[int]], pad: int, device: torch.device
) -> Canvas:
    """Left-pad ``left`` parts, then ``middle`` slots of ``fill``, then right parts, right-padded."""
    width_l = max(len(x) for x in left)
    width_r = max(len(x) for x in right)
    ids, valid = [], []
    for lft, rgt in zip(left, right):
        pl, pr = width_l - len(lft), width_r - len(rgt)
        ids.append([pad] * pl + lft + [fill] * middle + rgt + [pad] * pr)
        valid.append([False] * pl + [True] * (len(lft) + middle + len(rgt)) + [False] * pr)
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    valid_t = torch.tensor(valid, dtype=torch.bool, device=device)
    positions = (valid_t.long().cumsum(dim=1) - 1).clamp(min=0)
    return Canvas(ids_t, positions, None if bool(valid_t.all()) else valid_t, width_l, middle)


def finish(region: list[list[int]], ends: list[int], stop_at_eos: bool) -> tuple[list[list[int]], list[str]]:
    """Trim each row: cut at the first end token (stop_at_eos) or drop trailing end tokens."""
    sequences, reasons = [], []
    for row in region:
        cut = next((i for i, t in enumerate(row) if t in ends), None) if stop_at_eos else None
        if cut is not None:
            sequences.append(row[:cut])
            reasons.append("stop")
            continue
        while row and row[-1] in ends:
            row = row[:-1]
        sequences.append(row)
        reasons.append("length")
    return sequences, reasons


def result(
    sequences: list[list[int]], reasons: list[str], nfe: int, steps: list[int], trace: list[Tensor] | None, started: float
) -> GenerationResult:
    """Bundle the outcome; TPF counts each row's tokens against the forward calls it took part in."""
    tpf = sum(len(s) for s in sequences) / max(sum(steps), 1)
    return GenerationResult(sequences, reasons, nfe, steps, tpf, trace, time.perf_counter() - started)


# ---------------------------------------------------------------------------- block plan


def block_bounds(n: int, size: int, offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) of each block of the generated region; the first is shortened by ``offset % size``."""
    edges = [0]
    edge = size - offset % size
    while edge < n:
        edges.append(edge)
        edge += size
    edges.append(n)
    return list(zip(edges[:-1], edges[1:]))


def block_budgets(blocks: list[tuple[int, int]], n: int, steps: int | None) -> list[int]:
    """Steps per block: steps * block / N (integer shares summing to ``steps``), within [1, block]."""
    if steps is None:
        return [e - s for s, e in blocks]
    return [min(max(steps * e // n - steps * s // n, 1), e - s) for s, e in blocks]


def spread(m: int, s: int) -> list[int]:
    """m tokens over s steps: m // s each, the remainder to the first steps."""
    base, extra = divmod(m, s)
    return [base + 1] * extra + [base] * (s - extra)


@dataclass
class RowState:
    blocks: list[tuple[int, int]]
    budgets: list[int]
    generator: torch.Generator
    block: int = 0
    step: int = 0  # steps spent in the current block
    quotas: list[int] = field(default_factory=list)
    steps: int = 0
    done: bool = False

    def plan(self, masked: int) -> StepPlan:
        if self.step == 0:
            self.quotas = spread(masked, self.budgets[self.block])
        i = min(self.step, len(self.quotas) - 1)
        return StepPlan(masked=masked, quota=self.quotas[i], steps_left=max(self.budgets[self.block] - self.step, 1))


# ---------------------------------------------------------------------------- the loop


def candidates(region: Tensor, row: RowState, mask_id: int) -> Tensor:
    """Masked positions (region indices) of the row's current block, moving to the next block if needed."""
    while True:
        s, e = row.blocks[row.block]
        idx = (region[s:e] == mask_id).nonzero().flatten() + s
        if idx.numel():
            return idx
        row.block, row.step = row.block + 1, 0


def early_stop(region: Tensor, ends: Tensor, mask_id: int) -> None:
    """If an end token is committed with everything before it decided, fill the rest with it."""
    is_end = torch.isin(region, ends)
    if not bool(is_end.any()):
        return
    first_end = int(is_end.int().argmax())
    masked = region == mask_id
    first_mask = int(masked.int().argmax()) if bool(masked.any()) else region.shape[0]
    if first_end < first_mask:
        region[first_end + 1 :] = region[first_end]


def plan_rows(model: nn.Module, left: list[list[int]], config: GenerationConfig, seeds: list[int] | None) -> list[RowState]:
    """Blocks, step budgets and a generator for every row."""
    mc, n = model.config, config.max_new_tokens
    size, aligned = config.block_size, mc.attention == "block"
    if aligned:
        size = mc.block_size if size is None else size
        if size != mc.block_size:
            raise UnmaskError(f"this block-causal model decodes with block_size {mc.block_size}, got {size}")
    rows = []
    for lft, gen in zip(left, row_generators(len(left), config, seeds)):
        bounds = block_bounds(n, n if size is None else size, len(lft) if aligned else 0)
        rows.append(RowState(bounds, block_budgets(bounds, n, config.steps), gen))
    return rows


def commit(row: RowState, region: Tensor, pos: Tensor, tokens: Tensor, ends: Tensor | None, mask_id: int) -> Tensor:
    """Write one row's picks (and an early stop's EOS fill); returns the positions written."""
    before = region.clone()
    region[pos] = tokens
    if ends is not None:
        early_stop(region, ends, mask_id)
    written = region != before
    row.steps, row.step = row.steps + 1, row.step + 1
    row.done = not bool((region == mask_id).any())
    s, e = row.blocks[row.block]
    if row.step >= row.budgets[row.block] and bool((region[s:e] == mask_id).any()):
        raise RuntimeError(f"block {row.block} is unfinished after its step budget: the policy made no progress")
    return written


def block_start(canvas: Canvas, r: int, row: RowState, mc: ModelConfig) -> int:
    """Canvas slot where row r's current block begins; for block-causal models the block is aligned
    to absolute positions, so it may begin inside the prompt."""
    slot = canvas.start + row.blocks[row.block][0]
    if mc.attention == "block":
        slot -= int(canvas.positions[r, slot]) % mc.block_size
    return slot


def _decode(
    model: nn.Module,
    left: list[list[int]],
    right: list[list[int]],
    config: GenerationConfig,
    seeds: list[int] | None,
    on_step: Callable[[StepEvent], None] | None,
    forward: LogitsFn | None,
    heal: Sequence[Healing | None] | None = None,
) -> GenerationResult:
    started = time.perf_counter()
    config.validate()
    mc = model.config
    mask_id, n = mc.mask_token_id, config.max_new_tokens
    if mask_id is None:
        raise UnmaskError("diffusion decoding needs a model with mask_token_id")
    check_prompts(model, left, [n + len(r) for r in right])
    check_heal(heal, len(left))
    if mc.shifted and any(len(x) == 0 for x in left):
        raise UnmaskError("a shifted model needs a non-empty prompt (the first prediction comes from the token before it)")
    rows = plan_rows(model, left, config, seeds)
    device = model_device(model)
    canvas = pad_batch(left, n, mask_id, right, pad_id(mc), device)
    ends_list = end_ids(mc, config)
    ends = stop_tensor(ends_list, config, device)
    policy = make_policy(config)
    if forward is None:
        forward = full_forward(model) if config.cache == "none" else block_cache(model, config.cache, config.cache_refresh)
    shift = 1 if mc.shifted else 0
    nfe, step, trace = 0, 0, [] if config.trace else None

    with torch.no_grad():
        while not all(row.done for row in rows):
            active = [r for r, row in enumerate(rows) if not row.done]
            region = canvas.region
            cands = [candidates(region[r], rows[r], mask_id) for r in active]
            lo = canvas.start + min(int(c[0]) for c in cands)
            hi = canvas.start + max(rows[r].blocks[rows[r].block][1] for r in active)
            sel = None if len(active) == len(rows) else torch.tensor(active, device=device)
            span = slice(min(block_start(canvas, r, rows[r], mc) for r in active), hi)
            logits = forward(canvas, sel, slice(lo - shift, hi - shift), span)
            nfe += 1
            plans = [rows[r].plan(c.numel()) for r, c in zip(active, cands)]
            gens = [rows[r].generator for r in active]
            heals, regions = (None, None) if heal is None else ([heal[r] for r in active], region[active])
            picks = select(policy, logits, canvas.start - lo, cands, plans, gens, config, mask_id, heals, regions)
            committed = torch.zeros(region.shape, dtype=torch.bool, device=device)
            for r, (pos, tokens) in zip(active, picks):
                committed[r] = commit(rows[r], region[r], pos, tokens, ends, mask_id)
            if trace is not None:
                trace.append(region.cpu().clone())
            if on_step is not None:
                done = torch.tensor([row.done for row in rows])
                on_step(StepEvent(step, nfe, region.clone(), committed, done, mask_id))
            step += 1

    sequences, reasons = finish(canvas.region.tolist(), ends_list, config.stop_at_eos)
    return result(sequences, reasons, nfe, [row.steps for row in rows], trace, started)


def select(
    policy: Policy,
    logits: Tensor,
    base: int,
    cands: list[Tensor],
    plans: list[StepPlan],
    gens: list[torch.Generator],
    config: GenerationConfig,
    mask_id: int,
    heals: Sequence[Healing | None] | None = None,
    regions: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """(region positions, tokens) to commit for each active row; ``heals`` (with the rows' ``regions``
    [A, N]) constrain the first generated tokens (token healing)."""

    def sample(positions: list[Tensor]) -> Predictions:
        flat = torch.cat([logits[a, p + base] for a, p in enumerate(positions)])
        pred = predict(
            flat,
            [p.numel() for p in positions],
            gens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            mask_id=mask_id,
            healing=heal_slots(heals, regions, positions, mask_id),
        )
        if bool((pred.tokens == mask_id).any()):
            raise RuntimeError("the sampler chose [MASK]; decoding would never finish")
        return pred

    out = []
    if policy.uses_predictions:
        pred = sample(cands)
        scores = policy.score(pred)
        offset = 0
        for c, plan, gen in zip(cands, plans, gens):
            part = slice(offset, offset + c.numel())
            chosen = policy.select(scores[part], plan, gen).to(c.device)
            out.append((c[chosen], pred.tokens[part][chosen]))
            offset += c.numel()
        return out
    chosen = [c[policy.select(None, plan, gen).to(c.device)] for c, plan, gen in zip(cands, plans, gens)]
    pred = sample(chosen)
    offset = 0
    for pos in chosen:
        out.append((pos, pred.tokens[offset : offset + pos.numel()]))
        offset += pos.numel()
    return out


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
    return _decode(model, [list(p) for p in prompts], [[] for _ in prompts], config, seeds, on_step, forward, heal)


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
    if len(prefixes) != len(suffixes):
        raise UnmaskError(f"got {len(prefixes)} prefixes but {len(suffixes)} suffixes")
    if model.config.attention != "bidirectional":
        raise UnmaskError(f"infilling needs a bidirectional model, this one is {model.config.attention}")
    return _decode(model, [list(p) for p in prefixes], [list(s) for s in suffixes], config, seeds, on_step, forward, heal)
