"""Static shapes: the fast path for GPUs, built on the same diffusion and AR steps as the rest.

``FastDecoder`` runs ``unmask.decoding.step.DiffusionBatch`` arranged so that every tensor keeps
its shape inside a block:
- the canvas is right-padded to a bucket of ``bucket`` slots, so prompts of many lengths share
  one shape; the KV cache is pinned per (batch, width) and written by index from a device tensor
  (``cache_start`` as a tensor);
- rows move through blocks together (``lockstep``): a block starts with one full pass (which also
  fills the cache) and then runs fixed-width passes over the block alone (the dual cache); both
  can be captured as CUDA graphs (``compile=True`` uses ``torch.compile(mode="reduce-overhead")``);
- predictions and the confidence/threshold policies run on the device (``select_on_device``):
  greedy tokens or float32 Gumbel-max with a per-row device generator.
A row whose block is done commits nothing while the others finish, so its output does not depend
on the batch. Greedy results equal ``generate(..., cache="dual")``; sampled ones use another
random stream. ``FastARDecoder`` is greedy AR decoding with a static one-token step.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from unmask.decoding.canvas import (
    Canvas,
    GenerationResult,
    LogitsFn,
    check_inputs,
    end_ids,
    finish,
    model_device,
    pad_batch,
    pad_id,
    result,
    stop_tensor,
)
from unmask.decoding.config import GenerationConfig
from unmask.decoding.healing import UNDECIDED, Healing, Slots, restrict
from unmask.decoding.step import DEVICE_POLICIES, DiffusionBatch, make_row
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode
from unmask.models.transformer import KVCache


def unsupported(model: nn.Module, config: GenerationConfig) -> str | None:
    """Why the fast path cannot run this model/config (None when it can)."""
    mc = model.config
    if mc.attention != AttentionMode.BIDIRECTIONAL:
        return f"the fast path decodes bidirectional models; this one is {mc.attention}"
    if config.policy not in DEVICE_POLICIES:
        return f"the fast path supports the policies {', '.join(DEVICE_POLICIES)}, not {config.policy}"
    if mc.mask_token_id is None:
        return "diffusion decoding needs a model with mask_token_id"
    return None


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


class StaticDualCache:
    """The dual block cache as a ``LogitsFn`` of static shapes: a full pass over the bucketed canvas
    when a block begins (or ``refresh`` steps later), fixed-width passes over the block between."""

    def __init__(self, decoder: "FastDecoder", canvas: Canvas, refresh: int | None) -> None:
        self.decoder, self.refresh = decoder, refresh
        self.shift = 1 if decoder.model.config.shifted else 0
        self.cache = decoder._cache(*canvas.ids.shape)
        ones = torch.ones_like(canvas.ids, dtype=torch.bool)
        self.valid = ones if canvas.valid is None else canvas.valid
        self.block: int | None = None
        self.since = 0

    def __call__(self, canvas: Canvas, rows: Tensor | None, window: slice, span: slice) -> Tensor:
        d, ids, positions = self.decoder, canvas.ids, canvas.positions
        batch, width = ids.shape
        w = window.stop - window.start
        if self.block != span.start or (self.refresh is not None and self.since >= self.refresh):
            self.block, self.since = span.start, 0
            d.shapes.add(("full", batch, width))
            index = torch.arange(window.start, window.stop, device=ids.device)
            logits = d._full(ids, positions, self.valid, self.cache, index)
        else:
            lo, hi = window.start, span.stop
            d.shapes.add(("block", batch, hi - lo))
            slot = torch.tensor(lo, device=ids.device)
            logits = d._block(ids[:, lo:hi], positions[:, lo:hi], self.valid[:, lo:hi], self.cache, slot, w)
        self.since += 1
        return logits if rows is None else logits[rows]


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
        model = self.model
        check_inputs(model, prompts, config, heal=heal)
        reason = unsupported(model, config)
        if reason:
            raise UnmaskError(reason)
        device = model_device(model)
        base = config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()))
        gens = [torch.Generator(device=device).manual_seed(int(seeds[r] if seeds else base)) for r in range(len(prompts))]
        batch = DiffusionBatch(
            model, lambda canvas: StaticDualCache(self, canvas, config.cache_refresh),
            bucket=self.bucket, lockstep=True, on_device=True,
        )
        heals = heal if heal is not None else [None] * len(prompts)
        rows = [batch.add(make_row(model, p, config, g, heal=h)) for p, g, h in zip(prompts, gens, heals)]
        policy = rows[0].policy
        for row in rows:  # one config, one policy: the rows share the device selection
            row.policy = policy
        with torch.no_grad():
            while not batch.done:
                batch.step()
        sequences, reasons = finish([batch.region(row) for row in rows], end_ids(model.config, config), config.stop_at_eos)
        return result(sequences, reasons, batch.nfe, [row.steps for row in rows], None, started)


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
        model, mc = self.model, self.model.config
        check_inputs(model, prompts, config, heal=heal)
        if config.temperature > 0 or config.top_k or config.top_p:
            raise UnmaskError("the fast AR path decodes greedily; use ar_generate for sampling")
        prompts = [list(p) for p in prompts]
        n, batch = config.max_new_tokens, len(prompts)
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
