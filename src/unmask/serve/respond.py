"""Running a plan on the engine and answering: one JSON body, or a stream of server-sent events.

Each choice is one engine request. Its events (a ``Frame`` per step, then a ``Final``) go
through a ``TextTracker``; streaming sends the tracker's deltas (and, with ``diffusing``, the
canvas after every step), non-streaming sends the tracker's final text, so both give the same
text. A client that goes away has its requests cancelled: a stream's generator is cancelled
by the server, a plain request watches for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from unmask.engine import EngineClosed, Final, Frame, Handle, QueueFull
from unmask.errors import UnmaskError
from unmask.serve.errors import APIError
from unmask.serve.metrics import ServerMetrics
from unmask.serve.plan import Choice, Plan
from unmask.serve.schemas import (
    AssistantMessage,
    Canvas,
    ChatChoice,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DecodingStats,
    Usage,
    chunk_choice,
)
from unmask.serve.settings import ServedModel, ServeSettings
from unmask.serve.text import TextTracker, canvas_view


@dataclass
class Update:
    """What one event of one choice means for the client."""

    index: int  # the choice
    delta: str  # new settled text
    canvas: Canvas | None  # the canvas after this step (diffusing streams only)
    finish: str | None  # set on the choice's last update


@dataclass
class ChoiceRun:
    """One choice in flight: its engine handle and its text so far."""

    choice: Choice
    handle: Handle
    tracker: TextTracker
    diffusing: bool
    final: Final | None = None
    last_view: Canvas | None = None
    error: APIError | None = None  # set when the engine could not finish this choice
    steps: int = 0  # steps taken so far

    @property
    def finish_reason(self) -> str:
        if self.tracker.stopped or self.final is None:
            return "stop"
        return self.final.finish_reason

    async def events(self) -> AsyncIterator[Update]:
        """The choice's updates, ending with the one that carries its finish reason."""
        tok, index = self.tracker.tokenizer, self.choice.index
        async for event in self.handle:
            if isinstance(event, Frame):
                if self.tracker.done:
                    continue  # cut by a stop string; the cancellation is on its way
                self.tracker.advance(event.canvas, event.mask_id)
                self.steps = event.step
                view = None
                if self.diffusing:  # detokenising a whole canvas: off the event loop
                    view = self.last_view = await asyncio.to_thread(
                        canvas_view, tok, event.canvas, event.mask_id, event.step, event.committed, self.tracker.cut)
                if self.tracker.stopped:
                    self.handle.cancel()
                    continue  # the final update carries what is left
                delta = self.tracker.delta()
                if delta or view is not None:
                    yield Update(index, delta, view, None)
                continue
            self.final = event
            self.steps = max(self.steps, event.steps)
            if event.finish_reason in ("stop", "length"):
                self.tracker.finish(event.tokens)
            elif event.finish_reason == "aborted":
                self.error = APIError(503, "the server shut down before this request finished", code="shutdown")
            elif event.finish_reason == "error":
                self.error = APIError(500, f"the model failed on this request ({event.error})", type="server_error",
                                      code="engine_error")
            elif not self.tracker.stopped:  # cancelled by someone else (the server is going away)
                self.error = APIError(503, "the request was cancelled", code="cancelled")
            if self.error is not None:
                return
            view = None
            if self.diffusing and self.last_view is not None:
                view = self.last_view.model_copy(update={"committed": []})
            yield Update(index, self.tracker.delta(final=True), view, self.finish_reason)
            return

    def cancel(self) -> None:
        if self.handle.final is None:
            self.handle.cancel()


def submit(served: ServedModel, plan: Plan, settings: ServeSettings) -> list[ChoiceRun]:
    """Queue every choice, or none: a full queue is a 429 with Retry-After."""
    runs: list[ChoiceRun] = []
    tok = served.loaded.tokenizer
    try:
        for choice in plan.choices:
            handle = served.engine.submit(choice.request)
            healed = choice.request.heal  # the answer re-spells the bytes healing cut from the prompt
            tracker = TextTracker(tok, choice.ends, plan.stops, skip=len(healed.removed) if healed else 0)
            runs.append(ChoiceRun(choice, handle, tracker, plan.diffusing))
    except QueueFull as exc:
        _cancel(runs)
        raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(settings.retry_after_s)}) from None
    except EngineClosed as exc:
        _cancel(runs)
        raise APIError(503, str(exc), code="shutting_down") from None
    except UnmaskError as exc:
        _cancel(runs)
        raise APIError(400, str(exc)) from None
    return runs


def _cancel(runs: list[ChoiceRun]) -> None:
    for run in runs:
        run.cancel()


@dataclass
class Responder:
    """Answers one planned request; records its latency and outcome."""

    request: Request
    served: ServedModel
    plan: Plan
    runs: list[ChoiceRun]
    metrics: ServerMetrics
    endpoint: str
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.plan.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"

    def record(self, outcome: str) -> None:
        self.metrics.requests.labels(self.served.name, self.endpoint, outcome).inc()
        if outcome == "ok":
            self.metrics.latency.labels(self.served.name, self.endpoint).observe(time.perf_counter() - self.started)

    def usage(self) -> Usage:
        completion = sum(len(run.tracker.ids) for run in self.runs)
        return Usage(prompt_tokens=self.plan.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.plan.prompt_tokens + completion)

    # ------------------------------------------------------------------ one JSON body

    async def json(self) -> Response:
        work = asyncio.ensure_future(self._drain_all())
        gone = asyncio.ensure_future(_wait_disconnect(self.request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                _cancel(self.runs)
        if work not in done:
            self.record("disconnected")
            return Response(status_code=499)  # nobody reads it
        work.result()  # a failure here is a bug: the catch-all handler answers 500
        errors = [run.error for run in self.runs if run.error is not None]
        if errors:
            self.record("aborted" if errors[0].status == 503 else "error")
            return errors[0].response()
        self.record("ok")
        return JSONResponse(self._body().model_dump())

    async def _drain_all(self) -> None:
        async def drain(run: ChoiceRun) -> None:
            async for _ in run.events():
                pass

        await asyncio.gather(*(drain(run) for run in self.runs))

    def _body(self) -> CompletionResponse | ChatCompletionResponse:
        usage = self.usage()
        steps = [run.steps for run in self.runs]
        stats = DecodingStats(
            steps=max(steps, default=0),
            tokens_per_step=round(usage.completion_tokens / max(sum(steps), 1), 4),
            elapsed_s=round(time.perf_counter() - self.started, 4),
        )
        name = self.served.name
        if self.plan.kind == "chat":
            chat = [ChatChoice(index=r.choice.index, message=AssistantMessage(content=r.tracker.text),
                               finish_reason=r.finish_reason) for r in self.runs]
            return ChatCompletionResponse(id=self.id, created=self.created, model=name, choices=chat,
                                          usage=usage, unmask=stats)
        text = [CompletionChoice(index=r.choice.index, text=r.tracker.text, finish_reason=r.finish_reason)
                for r in self.runs]
        return CompletionResponse(id=self.id, created=self.created, model=name, choices=text, usage=usage,
                                  unmask=stats)

    # ------------------------------------------------------------------ server-sent events

    def stream(self) -> Response:
        return EventStream(self._events(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.plan.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.served.name,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage.model_dump()
        return _sse(body)

    async def _events(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[Update | APIError | None] = asyncio.Queue()

        async def pump(run: ChoiceRun) -> None:
            async for update in run.events():
                queue.put_nowait(update)
            queue.put_nowait(run.error)

        tasks = [asyncio.ensure_future(pump(run)) for run in self.runs]
        outcome = "disconnected"
        try:
            if self.plan.kind == "chat":
                for run in self.runs:
                    yield self._chunk([chunk_choice("chat", run.choice.index, "", None, None, role=True)])
            pending = len(tasks)
            while pending:
                item = await queue.get()
                if item is None:
                    pending -= 1
                elif isinstance(item, APIError):
                    outcome = "aborted" if item.status == 503 else "error"
                    yield _sse(item.body())
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield self._chunk([chunk_choice(self.plan.kind, item.index, item.delta, item.finish, item.canvas)])
            if self.plan.include_usage:
                yield self._chunk([], self.usage())
            yield "data: [DONE]\n\n"
            outcome = "ok"
        finally:
            for task in tasks:
                task.cancel()
            _cancel(self.runs)
            self.record(outcome)


class EventStream(StreamingResponse):
    """A streaming response that always closes its generator, however the send ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
