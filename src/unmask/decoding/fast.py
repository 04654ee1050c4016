"""Static-shape diffusion decoding: the fast path for bidirectional models on a GPU.

The same semi-autoregressive block decoding as ``generate`` with the dual block cache, arranged
so that every tensor keeps its shape and nothing waits for the host inside a block:
- the canvas is right-padded to a bucket of ``bucket`` slots, so prompts of many lengths share
  one shape; the KV cache is written by index from a device tensor (``cache_start`` as a tensor);
- a block starts with one full pass (which also fills the cache) and then runs fixed-width
  passes over the block alone; both can be captured as CUDA graphs (``compile=True`` uses
  ``torch.compile(mode="reduce-overhead")``);
- predictions and the policy run on the device: greedy tokens or float32 Gumbel-max with a
  per-row device generator; confidence is ``exp(logit - logsumexp)`` in float32, no float64
  softmax; the confidence policy's per-step counts come from the host schedule, so the only
  host reads are once per block (is everything finished?) and, for the threshold policy, once
  per step (is the block finished?).
Rows of a batch move through blocks together; a row whose block is done commits nothing while
the others finish, so its output does not depend on the batch. Greedy results equal
``generate(..., cache="dual")``; sampled ones use another random stream.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from unmask.decoding.generate import (
    GenerationConfig,
    GenerationResult,
    block_bounds,
    block_budgets,
    check_heal,
    check_prompts,
    end_ids,
    finish,
    model_device,
    pad_batch,
    pad_id,
    result,
    spread,
    stop_tensor,
)
from unmask.decoding.healing import UNDECIDED, Healing, Slots, restrict
from unmask.decoding.sampling import filter_logits
from unmask.errors import UnmaskError
from unmask.models.transformer import KVCache

FAST_POLICIES = ("confidence", "threshold")


def unsupported(model: nn.Module, config: GenerationConfig) -> str | None:
    """Why the fast path cannot run this model/config (None when it can)."""
    mc = model.config
    if mc.attention != "bidirectional":
        return f"the fast path decodes bidirectional models; this one is {mc.attention}"
    if config.policy not in FAST_POLICIES:
        return f"the fast path supports the policies {', '.join(FAST_POLICIES)}, not {config.policy}"
    if mc.mask_token_id is None:
        return "diffusion decoding needs a model with mask_token_id"
    return None


def choose(
    logits: Tensor,
    block: Tensor,
    config: GenerationConfig,
    mask_id: int,
    count: Tensor | None,
    steps_left: int,
    noise: Tensor | None,
    healing: Sequence[Slots | None] | None = None,
) -> Tensor:
    """The block after one step: logits [B, W, V] predict each slot of ``block`` [B, W]; ``healing``
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


def early_stop(region: Tensor, ends: Tensor, mask_id: int) -> Tensor:
    """Rows whose first end token has everything before it decided: the rest becomes that token."""
    n = region.shape[1]
    is_end = torch.isin(region, ends)
    first_end = torch.where(is_end.any(-1), is_end.int().argmax(-1), n)
    masked = region == mask_id
    first_mask = torch.where(masked.any(-1), masked.int().argmax(-1), n)
    fill = (first_end < first_mask)[:, None] & (torch.arange(n, device=region.device) > first_end[:, None])
    end_token = region.gather(1, first_end.clamp(max=n - 1)[:, None])
    return torch.where(fill, end_token, region)


def block_slots(heal: Sequence[Healing | None] | None, region: Tensor, s: int, e: int, mask_id: int) -> list[Slots | None] | None:
    """Token-healing slots of the block [s, e) of ``region`` [B, N] for ``choose``; None (no host read)
    once the block lies past every row's constraint."""
    if heal is None or all(h is None or s >= len(h.removed) for h in heal):
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


def compiled(fn: Callable[..., Tensor], backend: str) -> Callable[..., Tensor]:
    """``fn`` as one whole graph: CUDA graphs through inductor's reduce-overhead mode; another
    backend (e.g. "eager") only checks that it traces without breaks."""
    options = {"mode": "reduce-overhead"} if backend == "inductor" else {"backend": backend}
    return torch.compile(fn, fullgraph=True, **options)


def static_cache(model: nn.Module, batch: int, capacity: int, pinned: bool) -> KVCache:
    """A KV cache for the static passes; ``pinned`` marks its buffers as fixed addresses, so that
    captured graphs may write into them in place."""
    param = next(model.parameters())
    cache = KVCache.allocate(model.config, batch, capacity, dtype=param.dtype, device=param.device)
    if pinned:
        for t in [*cache.keys, *cache.values, cache.positions, cache.valid]:
            torch._dynamo.mark_static_address(t)
    return cache


class _StaticDecoder:
    """What both fast decoders share: bucketed widths and one pinned cache per (batch, capacity),
    reused across calls so that compiled graphs keep their addresses."""

    def __init__(self, model: nn.Module, compile: bool, bucket: int, backend: str) -> None:
        self.model, self.compile, self.bucket, self.backend = model, compile, bucket, backend
        self._caches: dict[tuple[int, int], KVCache] = {}

    def _pass(self, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        return compiled(fn, self.backend) if self.compile else fn

    def _capacity(self, width: int) -> int:
        return -(-width // self.bucket) * self.bucket

    def _cache(self, batch: int, capacity: int) -> KVCache:
        key = (batch, capacity)
        if key not in self._caches:
            self._caches[key] = static_cache(self.model, batch, capacity, self.compile)
        return self._caches[key]


class FastDecoder(_StaticDecoder):
    """Decodes batches with static shapes; keeps compiled passes per shape for reuse across calls."""

    def __init__(self, model: nn.Module, *, compile: bool = False, bucket: int = 64, backend: str = "inductor") -> None:
        super().__init__(model, compile, bucket, backend)
        self.shapes: set[tuple[str, int, int]] = set()  # (pass, batch, width) shapes run so far
        self._full = self._pass(self._full_pass)
        self._block = self._pass(self._block_pass)

    def _full_pass(self, ids: Tensor, positions: Tensor, valid: Tensor, cache: KVCache, index: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=torch.long, device=ids.device)
        return self.model(ids, positions, valid, cache=cache, cache_start=zero, logits_index=index)

    def _block_pass(self, ids: Tensor, positions: Tensor, valid: Tensor, cache: KVCache, slot: Tensor, width: int) -> Tensor:
        return self.model(ids, positions, valid, cache=cache, cache_start=slot, logits_index=slice(0, width))

    def generate(
        self,
        prompts: list[list[int]],
        config: GenerationConfig,
        *,
        seeds: list[int] | None = None,
        heal: Sequence[Healing | None] | None = None,
    ) -> GenerationResult:
        """``heal``: per prompt, a token-healing constraint on the first generated tokens (or None)."""
        started = time.perf_counter()
        config.validate()
        model, mc = self.model, self.model.config
        reason = unsupported(model, config)
        if reason:
            raise UnmaskError(reason)
        prompts = [list(p) for p in prompts]
        mask_id, n, batch = mc.mask_token_id, config.max_new_tokens, len(prompts)
        check_prompts(model, prompts, [n] * batch)
        check_heal(heal, batch)
        shift = 1 if mc.shifted else 0
        if shift and any(not p for p in prompts):
            raise UnmaskError("a shifted model needs a non-empty prompt (the first prediction comes from the token before it)")
        device = model_device(model)
        pad = pad_id(mc)
        canvas = pad_batch(prompts, n, mask_id, [[] for _ in prompts], pad, device)
        width = canvas.ids.shape[1]
        capacity = self._capacity(width)
        ids = torch.full((batch, capacity), pad, dtype=torch.long, device=device)
        ids[:, :width] = canvas.ids
        positions = torch.arange(capacity, device=device).expand(batch, capacity).clone()
        positions[:, :width] = canvas.positions
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        valid[:, :width] = True if canvas.valid is None else canvas.valid
        cache = self._cache(batch, capacity)
        start = canvas.start
        ends_list = end_ids(mc, config)
        ends = stop_tensor(ends_list, config, device)
        gens = None
        if config.temperature > 0:
            base = config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()))
            gens = [torch.Generator(device=device).manual_seed(int(seeds[r] if seeds else base)) for r in range(batch)]
        steps = torch.zeros(batch, dtype=torch.long, device=device)
        nfe = 0
        blocks = block_bounds(n, config.block_size or n)
        for (s, e), budget in zip(blocks, block_budgets(blocks, n, config.steps)):
            if not bool((ids[:, start : start + n] == mask_id).any()):
                break  # every row ended early
            w, lo = e - s, start + s - shift
            index = torch.arange(lo, lo + w, device=device)
            slot = torch.tensor(lo, device=device)
            quotas = spread(w, budget)
            for step in range(budget):
                if step == 0 or (config.cache_refresh is not None and step % config.cache_refresh == 0):
                    self.shapes.add(("full", batch, capacity))
                    logits = self._full(ids, positions, valid, cache, index)
                else:
                    self.shapes.add(("block", batch, w + shift))
                    hi = start + e
                    logits = self._block(ids[:, lo:hi], positions[:, lo:hi], valid[:, lo:hi], cache, slot, w)
                nfe += 1
                block = ids[:, start + s : start + e]
                steps += (block == mask_id).any(-1)
                noise = None
                if gens is not None:
                    u = torch.stack([torch.rand((w, logits.shape[-1]), generator=g, device=device) for g in gens])
                    noise = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
                count = None
                if config.policy == "confidence":
                    count = torch.tensor(quotas[step], device=device)
                slots = block_slots(heal, ids[:, start : start + n], s, e, mask_id)
                ids[:, start + s : start + e] = choose(logits, block, config, mask_id, count, budget - step, noise, slots)
                if ends is not None:
                    ids[:, start : start + n] = early_stop(ids[:, start : start + n], ends, mask_id)
                if count is None and not bool((ids[:, start + s : start + e] == mask_id).any()):
                    break
        sequences, reasons = finish(ids[:, start : start + n].tolist(), ends_list, config.stop_at_eos)
        return result(sequences, reasons, nfe, steps.tolist(), None, started)


class FastARDecoder(_StaticDecoder):
    """AR decoding with a preallocated KV cache and a static one-token step (a CUDA graph when compiled)."""

    def __init__(self, model: nn.Module, *, compile: bool = False, bucket: int = 64, backend: str = "inductor") -> None:
        if not model.config.shifted:
            raise UnmaskError("AR decoding needs a shifted model (logit i predicts token i + 1)")
        super().__init__(model, compile, bucket, backend)
        self._step = self._pass(self._step_pass)

    def _step_pass(self, token: Tensor, position: Tensor, valid: Tensor, cache: KVCache, slot: Tensor) -> Tensor:
        return self.model(token, position, valid, cache=cache, cache_start=slot)[:, -1]

    def generate(
        self,
        prompts: list[list[int]],
        config: GenerationConfig,
        *,
        seeds: list[int] | None = None,
        heal: Sequence[Healing | None] | None = None,
    ) -> GenerationResult:
        """``heal``: per prompt, a token-healing constraint on the first generated tokens (or None)."""
        started = time.perf_counter()
        config.validate()
        model, mc = self.model, self.model.config
        if config.temperature > 0 or config.top_k or config.top_p:
            raise UnmaskError("the fast AR path decodes greedily; use ar_generate for sampling")
        prompts = [list(p) for p in prompts]
        n, batch = config.max_new_tokens, len(prompts)
        check_prompts(model, prompts, [n] * batch)
        check_heal(heal, batch)
        if any(not p for p in prompts):
            raise UnmaskError("AR decoding needs a non-empty prompt (at least a BOS token)")
        device = model_device(model)
        pad = pad_id(mc)
        canvas = pad_batch(prompts, 0, pad, [[] for _ in prompts], pad, device)
        width = canvas.ids.shape[1]
        cache = self._cache(batch, self._capacity(width + n))
        cache.valid.zero_()  # slots of an earlier call must not be seen
        valid = torch.ones_like(canvas.ids, dtype=torch.bool) if canvas.valid is None else canvas.valid
        zero = torch.zeros((), dtype=torch.long, device=device)
        mask_id = mc.mask_token_id
        with torch.no_grad():
            logits = model(canvas.ids, canvas.positions, valid, cache=cache, cache_start=zero, logits_index=slice(width - 1, width))[:, 0]
            if mask_id is not None:
                logits[:, mask_id] = float("-inf")
            out = torch.empty(batch, n, dtype=torch.long, device=device)
            longest = max((len(h.removed) for h in heal or () if h is not None), default=0)
            ar_heal(logits, heal, out, 0, longest)
            token = logits.argmax(-1, keepdim=True)
            position = canvas.positions[:, -1:] + 1
            slot = torch.tensor(width, device=device)
            ones = torch.ones(batch, 1, dtype=torch.bool, device=device)
            ends_list = end_ids(mc, config)
            ends = stop_tensor(ends_list, config, device)
            nfe, written = 1, n
            for i in range(n):
                out[:, i : i + 1] = token
                if i == n - 1:
                    break
                if ends is not None and i % 16 == 15 and bool(torch.isin(out[:, : i + 1], ends).any(-1).all()):
                    written = i + 1
                    break
                logits = self._step(token, position, ones, cache, slot).clone()
                if mask_id is not None:
                    logits[:, mask_id] = float("-inf")
                ar_heal(logits, heal, out, i + 1, longest)
                token = logits.argmax(-1, keepdim=True)
                position = position + 1
                slot = slot + 1
                nfe += 1
        rows = out[:, :written].tolist()
        sequences, reasons = finish(rows, ends_list, config.stop_at_eos)
        steps = [min(len(s) + (r == "stop"), written) for s, r in zip(sequences, reasons)]
        return result(sequences, reasons, nfe, steps, None, started)


def ar_heal(logits: Tensor, heal: Sequence[Healing | None] | None, out: Tensor, i: int, longest: int) -> None:
    """Greedy AR token healing: mask the logits [B, V] of generated position ``i`` given ``out[:, :i]``
    (in place); nothing to do (and no host read) once ``i`` is past every constraint."""
    if heal is None or i >= longest:
        return
    n = out.shape[1]
    region = torch.full((out.shape[0], n), UNDECIDED, dtype=torch.long)
    region[:, :i] = out[:, :i].cpu()
    slots = [
        None if h is None else Slots(h, region[r].tolist(), [i], [r]) for r, h in enumerate(heal)
    ]
    restrict(logits, slots, lambda k: int(logits[k].argmax()))
