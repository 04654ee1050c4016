"""The request engine: one loaded model serving many requests, batched at step granularity.

Requests wait in a bounded queue; a background thread admits them into the running batch
between steps (up to ``max_batch``), runs one step for all of them (the diffusion or AR step
that ``generate`` and ``ar_generate`` run: one forward pass, then each row's own commits), and
streams a ``Frame`` per step and a ``Final`` per request back to whoever submitted it: an
asyncio task (the server) or a plain thread. Finished and cancelled requests leave the batch
before the next step. The engine works on token ids only.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch
from torch import nn

from unmask.decoding.caches import CACHES
from unmask.decoding.config import GenerationConfig
from unmask.decoding.healing import Healing
from unmask.engine import jobs
from unmask.engine.jobs import Job
from unmask.errors import UnmaskError


MAX_BATCH = 8  # requests decoded together in one batch, unless told otherwise
MAX_QUEUE = 64  # requests that may wait for a batch slot; more are refused (QueueFull)


class QueueFull(UnmaskError):
    """The engine's waiting queue is full; the caller should retry later."""


class EngineClosed(UnmaskError):
    """The engine is shutting down and takes no more requests."""


@dataclass
class EngineRequest:
    prompt: list[int]  # prompt ids (for fill-in-the-middle: the prefix)
    config: GenerationConfig  # max_new_tokens, steps, policy, sampling, stop ids
    suffix: list[int] | None = None  # fill-in-the-middle: the text after the written middle
    seed: int | None = None  # overrides config.seed for this request
    frames: bool = True  # send a Frame after every step
    heal: Healing | None = None  # token healing: the answer's first tokens must spell heal.removed (see decoding.healing)


@dataclass
class Frame:
    step: int  # steps this request has taken, this one included (1-based)
    canvas: list[int]  # the generated region; ``mask_id`` marks undecided positions
    committed: list[int]  # region indices written by this step
    mask_id: int


@dataclass
class Final:
    tokens: list[int]  # generated ids, without the ending EOS/stop token
    finish_reason: str  # stop | length | cancelled | aborted | error
    steps: int  # forward passes this request took part in
    queued_s: float  # seconds spent waiting for a batch slot
    elapsed_s: float  # seconds from admission to the end
    error: str | None = None  # what went wrong, for finish_reason "error"


Event = Frame | Final


class Handle:
    """A submitted request: iterate it (async or sync) for its events; ``cancel()`` to drop it."""

    _serials = itertools.count()

    def __init__(self, request: EngineRequest, job: Job) -> None:
        self.request, self.job = request, job
        self.serial = next(Handle._serials)  # unique for the process's life (an id() may be reused)
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.cancelled = False
        self.final: Final | None = None
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._async: asyncio.Queue[Event] | None = asyncio.Queue() if self._loop else None
        self._sync: queue.Queue[Event] = queue.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, event: Event) -> None:
        if isinstance(event, Final):
            self.final = event
        if self._loop is None or self._async is None:
            self._sync.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async.put_nowait, event)
        except RuntimeError:  # the submitter's loop is closed: nobody is listening any more
            self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._async is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it synchronously")
        while True:
            event = await self._async.get()
            yield event
            if isinstance(event, Final):
                return

    def __iter__(self) -> Iterator[Event]:
        if self._async is not None:
            raise RuntimeError("this request was submitted inside an event loop; iterate it with `async for`")
        while True:
            event = self._sync.get()
            yield event
            if isinstance(event, Final):
                return

    def result(self) -> Final:
        """Block until the request ends (synchronous submitters only)."""
        for event in self:
            if isinstance(event, Final):
                return event
        raise AssertionError("unreachable")


@dataclass
class _Stats:
    requests: int = 0
    forward_passes: int = 0
    request_steps: int = 0
    tokens_generated: int = 0
    finished: Counter[str] = field(default_factory=Counter)


class Engine:
    """Serves one model; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int = MAX_BATCH,
        max_queue: int = MAX_QUEUE,
        cache: str = "none",
        cache_refresh: int | None = None,
        static: bool | None = None,
    ) -> None:
        """``static``: bucketed canvas widths and on-device selection for greedy confidence/threshold
        rows (the static-shape path); default: on a GPU, off on a CPU (where padding only costs time)."""
        if max_batch < 1 or max_queue < 0:
            raise UnmaskError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if cache not in CACHES:
            raise UnmaskError(f"unknown cache {cache!r} (choose from {', '.join(CACHES)})")
        # The running batch; its block cache (see decoding.caches) is kept while the batch's members
        # stay the same, and started afresh (one full pass) when a request joins or leaves.
        self.cache_mode, self.cache_refresh = cache, cache_refresh
        if static is None:
            static = next(model.parameters()).device.type == "cuda"
        self._batch = jobs.make_batch(model, cache, cache_refresh, static)
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.config = model.config
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._running: list[Handle] = []
        self._accepting, self._abort, self._stop = True, False, False
        self._thread: threading.Thread | None = None
        self._stats = _Stats()

    # ------------------------------------------------------------------ public

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="unmask-engine", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: EngineRequest) -> Handle:
        """Queue a request; raises ``QueueFull``, ``EngineClosed``, or ``UnmaskError`` for a request that cannot run."""
        seed = request.seed if request.seed is not None else request.config.seed
        job = jobs.make_job(self.model, list(request.prompt), request.config, seed, request.suffix, request.heal)
        handle = Handle(request, job)
        with self._cond:
            if not self._accepting:
                raise EngineClosed("the server is shutting down and takes no new requests")
            free_slots = max(self.max_batch - len(self._running), 0)
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(handle)
            self._stats.requests += 1
            self._cond.notify()
        return handle

    def stats(self) -> dict[str, int]:
        with self._cond:
            s = self._stats
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "requests": s.requests,
                "forward_passes": s.forward_passes,
                "request_steps": s.request_steps,
                "tokens_generated": s.tokens_generated,
                **{f"finished_{k}": v for k, v in s.finished.items()},
            }

    def shutdown_sync(self, timeout: float = 10.0) -> None:
        """Stop taking requests, let running and waiting ones finish, abort what is left at ``timeout``."""
        with self._cond:
            self._accepting = False
            self._cond.notify()
        deadline = time.monotonic() + timeout
        with self._cond:
            while (self._running or self._waiting) and time.monotonic() < deadline:
                self._cond.wait(timeout=min(0.05, max(deadline - time.monotonic(), 0.0)))
            self._abort = bool(self._running or self._waiting)
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(deadline - time.monotonic(), 0.0) + 5.0)
            self._thread = None
        if self._abort:  # the thread never ran (or died): end the rest here
            self._end_all("aborted")

    async def shutdown(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.shutdown_sync, timeout)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._running or self._waiting or self._stop):
                        self._cond.wait()
                    if self._stop and (self._abort or not (self._running or self._waiting)):
                        break
                    self._admit()
                    running = list(self._running)
                if running:
                    self._step(running)
                with self._cond:
                    self._cond.notify_all()
        self._end_all("aborted")

    def _admit(self) -> None:
        """Drop cancelled requests, then move waiting ones into free batch slots (lock held)."""
        for handle in [h for h in self._running if h.cancelled]:
            self._leave(handle)
            self._end(handle, "cancelled")
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            self._end(handle, "cancelled")
        while self._waiting and len(self._running) < self.max_batch:
            handle = self._waiting.popleft()
            handle.admitted = time.perf_counter()
            self._running.append(handle)
            self._batch.add(handle.job)  # type: ignore[arg-type]

    def _leave(self, handle: Handle) -> None:
        """Take a request out of the running batch (lock held)."""
        self._running.remove(handle)
        self._batch.remove(handle.job)  # type: ignore[arg-type]

    def _step(self, running: list[Handle]) -> None:
        """One step of the running batch, then a frame for every request that took part."""
        try:
            passes = self._batch.nfe
            if isinstance(self._batch, jobs.ARBatch):
                stepped = {id(row) for row in self._batch.step()}
                written = {h.serial: [len(h.job.out) - 1] for h in running if id(h.job) in stepped}  # type: ignore[union-attr]
            else:  # a row took part in the step when its step count moved
                before = {h.serial: h.job.steps for h in running}  # type: ignore[union-attr]
                committed = self._batch.step()
                order = {id(row): r for r, row in enumerate(self._batch.rows)}
                written = {
                    h.serial: committed[order[id(h.job)]].nonzero().flatten().tolist()
                    for h in running
                    if h.job.steps > before[h.serial]  # type: ignore[union-attr]
                }
            self._stats.forward_passes += self._batch.nfe - passes
            for handle in running:
                if handle.serial in written:
                    self._after(handle, written[handle.serial])
        except Exception as exc:  # a failure inside the model ends the batch, never the engine
            message = f"{type(exc).__name__}: {exc}"
            with self._cond:
                for handle in running:
                    if handle in self._running:
                        self._leave(handle)
                        self._end(handle, "error", message)
            return
        with self._cond:
            for handle in running:
                if handle.job.done and handle in self._running:
                    self._end(handle, None)
                    self._leave(handle)

    def _after(self, handle: Handle, written: list[int]) -> None:
        self._stats.request_steps += 1
        if handle.request.frames:
            job = handle.job
            handle._emit(Frame(jobs.steps(job), jobs.canvas(self._batch, job), written, jobs.undecided(self._batch)))

    # ------------------------------------------------------------------ endings

    def _end(self, handle: Handle, reason: str | None, error: str | None = None) -> None:
        """Send a request's ``Final`` (while it is still in the batch, whose canvas holds its tokens)."""
        batch, job = self._batch, handle.job
        tokens, natural = jobs.outcome(batch, job, self.model)
        reason = reason or natural
        if reason in ("stop", "length"):
            self._stats.tokens_generated += len(tokens)
        else:  # what was settled when the request ended: the region up to its first undecided slot
            canvas, mask = jobs.canvas(batch, job), jobs.undecided(batch)
            tokens = canvas[: canvas.index(mask)] if mask in canvas else canvas
        self._stats.finished[reason] += 1
        now = time.perf_counter()
        admitted = handle.admitted or now
        handle._emit(Final(tokens, reason, jobs.steps(job), admitted - handle.submitted, now - admitted, error))

    def _end_all(self, reason: str) -> None:
        with self._cond:
            for handle in list(self._running) + list(self._waiting):
                if handle.final is None:
                    self._end(handle, reason)
            self._running.clear()
            self._waiting.clear()
            self._cond.notify_all()
