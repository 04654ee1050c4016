"""One masked-diffusion step: the only place where a decoding path decides what to commit.

``DiffusionBatch`` holds rows being denoised together (a whole ``generate`` call, or the
engine's running requests, which join and leave between steps) on one canvas; ``step()`` runs
the model once for the rows that have work and commits each row's picks:

1. every running row moves to its first block that still has masks; with ``lockstep`` (the
   static-shape path) rows wait for the slowest one, so that the window keeps its width;
2. one forward call (a ``LogitsFn``: the full canvas, a block cache, or static passes) gives the
   logits of the running blocks;
3. each row's policy picks positions and tokens, on the host (every policy, per-row CPU random
   streams) or, for the threshold and confidence policies, on the device in one batched call;
4. an end token committed with everything before it decided fills the rest of its row.

Blocks are the semi-autoregressive schedule: the region is cut into blocks (block-causal models
align them to absolute positions, so the first may be short), each with a step budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from unmask.decoding.canvas import Canvas, LogitsFn, end_ids, model_device, pad_batch, pad_id, stop_tensor
from unmask.decoding.config import GenerationConfig
from unmask.decoding.healing import UNDECIDED, Healing, Slots, restrict
from unmask.decoding.policies import Policy, StepPlan, make_policy
from unmask.decoding.sampling import Predictions, filter_logits, predict
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode

DEVICE_POLICIES = ("confidence", "threshold")  # policies with a batched on-device selection


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


@dataclass(eq=False)
class Row:
    """One sequence being denoised: its text parts, schedule, settings and random stream."""

    prompt: list[int]
    suffix: list[int]
    config: GenerationConfig
    policy: Policy
    generator: torch.Generator
    blocks: list[tuple[int, int]]
    budgets: list[int]
    ends: Tensor | None  # end tokens that stop the row early (None: never)
    heal: Healing | None = None  # token healing: the first generated tokens must spell heal.removed
    block: int = 0  # the current block
    step: int = 0  # steps spent in the current block
    quotas: list[int] = field(default_factory=list)
    steps: int = 0  # steps this row committed in
    done: bool = False
    kept: list[int] | None = None  # the region when the batch's canvas was last taken apart (None: all masks)

    @property
    def length(self) -> int:
        return self.config.max_new_tokens

    def plan(self, masked: int) -> StepPlan:
        if self.step == 0:
            self.quotas = spread(masked, self.budgets[self.block])
        i = min(self.step, len(self.quotas) - 1)
        return StepPlan(masked=masked, quota=self.quotas[i], steps_left=max(self.budgets[self.block] - self.step, 1))


def block_size_for(model: nn.Module, config: GenerationConfig) -> int | None:
    """The block the schedule uses; a block-causal model decodes only with its own."""
    mc, size = model.config, config.block_size
    if mc.attention != AttentionMode.BLOCK:
        return size
    size = mc.block_size if size is None else size
    if size != mc.block_size:
        raise UnmaskError(f"this block-causal model decodes with block_size {mc.block_size}, got {size}")
    return size


def make_row(
    model: nn.Module,
    prompt: Sequence[int],
    config: GenerationConfig,
    generator: torch.Generator,
    *,
    suffix: Sequence[int] = (),
    heal: Healing | None = None,
    policy: Policy | None = None,
) -> Row:
    """A row's blocks, step budgets and end tokens (inputs are checked by ``canvas.check_inputs``)."""
    mc, n = model.config, config.max_new_tokens
    size = block_size_for(model, config)
    bounds = block_bounds(n, n if size is None else size, len(prompt) if mc.attention == AttentionMode.BLOCK else 0)
    ends = stop_tensor(end_ids(mc, config), config, model_device(model))
    return Row(list(prompt), list(suffix), config, policy or make_policy(config), generator, bounds,
               block_budgets(bounds, n, config.steps), ends, heal)


def early_stop(region: Tensor, ends: Tensor, mask_id: int, lengths: Tensor | None = None) -> Tensor:
    """Rows [B, N] whose first end token has everything before it decided: the rest of the row (up to
    its own length) becomes that token."""
    n = region.shape[1]
    slots = torch.arange(n, device=region.device)
    inside = slots < (n if lengths is None else lengths[:, None])
    is_end = torch.isin(region, ends) & inside
    first_end = torch.where(is_end.any(-1), is_end.int().argmax(-1), n)
    masked = (region == mask_id) & inside
    first_mask = torch.where(masked.any(-1), masked.int().argmax(-1), n)
    fill = (first_end < first_mask)[:, None] & (slots > first_end[:, None]) & inside
    end_token = region.gather(1, first_end.clamp(max=n - 1)[:, None])
    return torch.where(fill, end_token, region)


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


def select_on_host(
    policy: Policy,
    config: GenerationConfig,
    logits: Tensor,
    base: int,
    cands: list[Tensor],
    plans: list[StepPlan],
    gens: list[torch.Generator],
    mask_id: int,
    heals: Sequence[Healing | None] | None = None,
    regions: Tensor | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """(region positions, tokens) to commit for rows that share ``policy`` and ``config``: logits [A, W, V]
    with region position p of row a at ``logits[a, p + base]``; ``heals`` (with the rows' ``regions``
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


def select_on_device(
    logits: Tensor,
    block: Tensor,
    config: GenerationConfig,
    mask_id: int,
    count: Tensor | None,
    steps_left: int | Tensor,
    noise: Tensor | None,
    healing: Sequence[Slots | None] | None = None,
) -> Tensor:
    """The block [B, W] after one step of the confidence (``count`` [B, 1] commits per row) or threshold
    (``count`` None; ``steps_left``: per row or for all) policy, from logits [B, W, V] of its slots, in
    one batched call with no host read:
    greedy or Gumbel-max with float32 ``noise``; confidence is ``exp(logit - logsumexp)``. ``healing``
    constrains slots (flat index b * W + j) as ``unmask.decoding.healing.restrict`` does."""
    b, w, v = logits.shape
    filtered = filter_logits(
        logits.reshape(b * w, v), temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, mask_id=mask_id
    )
    picked: dict[int, int] = {}
    if healing is not None:
        flat_noise = None if noise is None else noise.reshape(b * w, v)

        def pick(k: int) -> int:
            picked[k] = int((filtered[k] if flat_noise is None else filtered[k] + flat_noise[k]).argmax())
            return picked[k]

        restrict(filtered, healing, pick)
    filtered = filtered.view(b, w, v)
    tokens = (filtered if noise is None else filtered + noise).argmax(dim=-1)
    for k, token in picked.items():
        tokens[k // w, k % w] = token
    confidence = (filtered.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(filtered, dim=-1)).exp()
    masked = block == mask_id
    confidence = confidence.masked_fill(~masked, -1.0)
    order = torch.sort(confidence, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(w, device=block.device).expand(b, w))
    if count is None:  # threshold: every confident one, at least one, at least what the step budget needs
        need = (masked.sum(-1) + steps_left - 1) // steps_left
        count = torch.maximum((confidence >= config.threshold).sum(-1), need.clamp(min=1))[:, None]
    return torch.where((rank < count) & masked, tokens, block)


def device_noise(gens: Sequence[torch.Generator], w: int, vocab: int, device: torch.device) -> Tensor:
    """Float32 Gumbel noise [B, w, vocab], each row from its own device generator."""
    u = torch.stack([torch.rand((w, vocab), generator=g, device=device) for g in gens])
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))


def block_slots(heal: Sequence[Healing | None], region: Tensor, s: int, e: int, mask_id: int) -> list[Slots | None] | None:
    """Token-healing slots of the block [s, e) of ``region`` [B, N] for ``select_on_device``; None (no
    host read) once the block lies past every row's constraint."""
    if all(h is None or s >= len(h.removed) for h in heal):
        return None
    w, out = e - s, []
    for r, (h, row) in enumerate(zip(heal, region.tolist())):
        masked = [j for j in range(w) if row[s + j] == mask_id]
        if h is None or not masked:
            out.append(None)
            continue
        region_row = [UNDECIDED if t == mask_id else t for t in row]
        out.append(Slots(h, region_row, [s + j for j in masked], [r * w + j for j in masked]))
    return out


class DiffusionBatch:
    """Rows denoised together on one canvas; see the module docstring.

    ``forward``: makes the ``LogitsFn`` for a canvas (a fresh one whenever the rows change, so a
    block cache never mixes layouts). ``bucket``: round the canvas width up to a multiple.
    ``lockstep``: rows move through blocks together (static window widths). ``on_device``: use
    the batched device selection where the running rows allow it: a policy in ``DEVICE_POLICIES``,
    the same selection settings and the same block columns; greedy rows only, unless the rows' generators
    live on the model's device (then sampling draws from them, another stream than the host's).
    """

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[Canvas], LogitsFn],
        *,
        bucket: int | None = None,
        lockstep: bool = False,
        on_device: bool = False,
    ) -> None:
        mc = model.config
        if mc.mask_token_id is None:
            raise UnmaskError("diffusion decoding needs a model with mask_token_id")
        self.model, self.make_forward, self.bucket = model, forward, bucket
        self.lockstep, self.on_device = lockstep, on_device
        self.mask_id, self.shift = mc.mask_token_id, 1 if mc.shifted else 0
        self.aligned = mc.block_size if mc.attention == AttentionMode.BLOCK else None
        self.device, self.pad = model_device(model), pad_id(mc)
        self.rows: list[Row] = []
        self.canvas: Canvas | None = None
        self.forward: LogitsFn | None = None
        self.masked: Tensor | None = None  # [B, N] host copy of which region slots are still masked
        self.nfe = 0

    # ------------------------------------------------------------------ membership

    def add(self, row: Row) -> Row:
        self._settle()
        self.rows.append(row)
        self.canvas = None
        return row

    def remove(self, row: Row) -> None:
        self._settle()
        self.rows.remove(row)
        self.canvas = None

    def region(self, row: Row) -> list[int]:
        """The row's region as it stands; ``mask_id`` marks undecided slots."""
        if self.canvas is not None and row in self.rows:
            return self.canvas.row_region(self.rows.index(row)).tolist()
        return list(row.kept or [self.mask_id] * row.length)

    def _settle(self) -> None:
        """Keep each row's region before the canvas is laid out anew."""
        if self.canvas is not None:
            for r, row in enumerate(self.rows):
                row.kept = self.canvas.row_region(r).tolist()

    def _layout(self) -> Canvas:
        if self.canvas is None:
            middles = [row.kept or [self.mask_id] * row.length for row in self.rows]
            self.canvas = pad_batch(
                [row.prompt for row in self.rows], middles, self.mask_id, [row.suffix for row in self.rows],
                self.pad, self.device, self.bucket,
            )
            self.forward = self.make_forward(self.canvas)
            self.masked = (self.canvas.region == self.mask_id).cpu()
        return self.canvas

    @property
    def done(self) -> bool:
        return all(row.done for row in self.rows)

    # ------------------------------------------------------------------ the step

    def step(self) -> Tensor:
        """One forward call and the commits it allows; returns [B, N] bool, the region slots written."""
        canvas = self._layout()
        assert self.forward is not None and self.masked is not None
        masked, start = self.masked, canvas.start
        running: list[int] = []
        cands: dict[int, Tensor] = {}
        firsts: dict[int, int] = {}
        for r, row in enumerate(self.rows):
            if row.done:
                continue
            while True:  # the row's first block that still has masks
                s, e = row.blocks[row.block]
                idx = masked[r, s:e].nonzero().flatten() + s
                if idx.numel():
                    break
                row.block, row.step = row.block + 1, 0
            running.append(r)
            firsts[r] = int(idx[0])
            cands[r] = idx.to(self.device)
        committed = torch.zeros(canvas.region.shape, dtype=torch.bool, device=self.device)
        if not running:
            return committed
        if self.lockstep:
            first = min(self.rows[r].block for r in running)
            running = [r for r in running if self.rows[r].block == first]
        blocks = [self.rows[r].blocks[self.rows[r].block] for r in running]
        # logits from the first masked slot on (the whole block for the static path, whose widths stay put)
        first = min(s for s, _ in blocks) if self.lockstep or self.on_device else min(firsts[r] for r in running)
        lo, hi = start + first, start + max(e for _, e in blocks)
        span_lo = min(self._block_start(self.rows[r], s) for r, (s, _) in zip(running, blocks))
        sel = None if len(running) == len(self.rows) else torch.tensor(running, device=self.device)
        logits = self.forward(canvas, sel, slice(lo - self.shift, hi - self.shift), slice(span_lo, hi))
        self.nfe += 1
        plans = [self.rows[r].plan(cands[r].numel()) for r in running]
        before = canvas.region.clone()
        if self._device_ready(running):
            self._commit_on_device(running, logits, plans)
        else:
            self._commit_on_host(running, logits, start - lo, cands, plans)
        region = canvas.region
        ends = [self.rows[r].ends for r in running]
        if ends[0] is not None and all(x is not None and torch.equal(x, ends[0]) for x in ends):
            idx = torch.tensor(running, device=self.device)
            lengths = torch.tensor([self.rows[r].length for r in running], device=self.device)
            region[idx] = early_stop(region[idx], ends[0], self.mask_id, lengths)
        else:
            for r in running:
                end = self.rows[r].ends
                if end is not None:
                    n = self.rows[r].length
                    region[r : r + 1, :n] = early_stop(region[r : r + 1, :n], end, self.mask_id)
        committed = region != before
        self.masked = (region == self.mask_id).cpu()
        for r in running:
            row = self.rows[r]
            row.steps, row.step = row.steps + 1, row.step + 1
            row.done = not bool(self.masked[r, : row.length].any())
            s, e = row.blocks[row.block]
            if row.step >= row.budgets[row.block] and bool(self.masked[r, s:e].any()):
                raise RuntimeError(f"block {row.block} is unfinished after its step budget: the policy made no progress")
        return committed

    def _block_start(self, row: Row, s: int) -> int:
        """Canvas column where a row's block begins; block-causal blocks are aligned to absolute
        positions (a region slot's position is the prompt length plus its index), so the block
        may begin inside the prompt."""
        slot = self.canvas.start + s  # type: ignore[union-attr]
        return slot if self.aligned is None else slot - (len(row.prompt) + s) % self.aligned

    def _device_ready(self, running: list[int]) -> bool:
        if not self.on_device:
            return False
        rows = [self.rows[r] for r in running]

        def settings(row: Row) -> tuple:
            c = row.config
            return c.policy, c.threshold, c.temperature, c.top_k, c.top_p, row.blocks[row.block]

        first = rows[0]
        return (
            first.config.policy in DEVICE_POLICIES
            and all(settings(row) == settings(first) for row in rows)
            and (first.config.greedy or all(row.generator.device == self.device for row in rows))
        )

    def _commit_on_host(
        self, running: list[int], logits: Tensor, base: int, cands: dict[int, Tensor], plans: list[StepPlan]
    ) -> None:
        region = self.canvas.region  # type: ignore[union-attr]
        groups: dict[int, list[int]] = {}
        for a, r in enumerate(running):
            groups.setdefault(id(self.rows[r].policy), []).append(a)
        for members in groups.values():
            rows = [self.rows[running[a]] for a in members]
            heals = None if all(row.heal is None for row in rows) else [row.heal for row in rows]
            regions = None if heals is None else region[[running[a] for a in members]]
            picks = select_on_host(
                rows[0].policy, rows[0].config, logits[members], base, [cands[running[a]] for a in members],
                [plans[a] for a in members], [row.generator for row in rows], self.mask_id, heals, regions,
            )
            for a, (pos, tokens) in zip(members, picks):
                region[running[a], pos] = tokens

    def _commit_on_device(self, running: list[int], logits: Tensor, plans: list[StepPlan]) -> None:
        """The rows share one block [bs, be), and the step's window is exactly that block."""
        rows = [self.rows[r] for r in running]
        config, (bs, be) = rows[0].config, rows[0].blocks[rows[0].block]
        region = self.canvas.region  # type: ignore[union-attr]
        idx = torch.tensor(running, device=self.device)
        block = region[idx, bs:be]
        w = be - bs
        noise = None if config.greedy else device_noise([row.generator for row in rows], w, logits.shape[-1], self.device)
        count = None
        if config.policy == "confidence":
            count = torch.tensor([p.quota for p in plans], device=self.device)[:, None]
        heals = [row.heal for row in rows]
        slots = None if all(h is None for h in heals) else block_slots(heals, region[idx], bs, be, self.mask_id)
        steps_left = torch.tensor([p.steps_left for p in plans], device=self.device)
        region[idx, bs:be] = select_on_device(logits, block, config, self.mask_id, count, steps_left, noise, slots)
