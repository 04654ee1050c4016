"""The FastAPI app: OpenAI-compatible routes over one engine per served model.

    app = create_app({"tiny": served}, ServeSettings(api_key="k"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /v1/fim/completions,
GET /health, GET /metrics, GET / (the playground) and /static/*. The wire format is described
in docs/serving.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from unmask.serve.body import parse_body
from unmask.serve.errors import APIError, install_error_handlers
from unmask.serve.gate import Gate
from unmask.serve.metrics import ServerMetrics
from unmask.serve.plan import Plan, plan_chat, plan_completion, plan_fim
from unmask.serve.render import TemplateRenderer
from unmask.serve.respond import Responder, submit
from unmask.serve.schemas import ChatCompletionRequest, CompletionRequest, FimRequest, ModelCard, ModelList
from unmask.serve.settings import MODEL_ALIASES, ServedModel, ServeSettings

STATIC_DIR = Path(__file__).parent / "static"

Body = TypeVar("Body", bound=BaseModel)


def create_app(models: Mapping[str, ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    """An app serving ``models`` (name -> model with its engine); engines start and stop with the app."""
    if not models:
        raise ValueError("create_app needs at least one model")
    settings = settings or ServeSettings()
    models = dict(models)
    metrics = ServerMetrics(models)
    started = int(time.time())

    renderer = TemplateRenderer(settings.template_timeout_s, settings.template_max_chars)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for served in models.values():
            served.engine.start()
            await asyncio.to_thread(lambda: served.max_text_bytes)  # the vocabulary scan, once
        try:
            yield
        finally:
            renderer.close()
            await asyncio.gather(*(s.engine.shutdown(settings.shutdown_timeout) for s in models.values()))

    app = FastAPI(title="unmask", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    def pick(name: str | None) -> ServedModel:
        if name is None:
            return next(iter(models.values()))
        served = models.get(name) or models.get(MODEL_ALIASES.get(name, ""))
        if served is None:
            raise APIError(404, f"the model {name!r} does not exist; served: {', '.join(models)}",
                           param="model", code="model_not_found")
        return served

    async def generate(request: Request, schema: type[Body], planner, endpoint: str) -> Response:
        # Parsing, tokenising and template rendering are CPU work: off the event loop, so that
        # /health and running streams are not held up by a large or hostile request.
        body = await asyncio.to_thread(parse_body, await request.body(), schema)
        served = pick(body.model)  # type: ignore[attr-defined]
        plan: Plan = await asyncio.to_thread(planner, body, served, settings, renderer)
        runs = submit(served, plan, settings)
        responder = Responder(request, served, plan, runs, metrics, endpoint)
        return responder.stream() if plan.stream else await responder.json()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, CompletionRequest, plan_completion, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatCompletionRequest, plan_chat, "chat")

    @app.post("/v1/fim/completions")
    async def fim_completions(request: Request) -> Response:
        return await generate(request, FimRequest, plan_fim, "fim")

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        cards = [
            ModelCard(id=name, created=started, attention=s.attention, diffusion=s.diffusion, max_model_len=s.max_len)
            for name, s in models.items()
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = {name: {k: s.engine.stats()[k] for k in ("running", "waiting")} for name, s in models.items()}
        return JSONResponse({"status": "ok", "models": stats})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        index = STATIC_DIR / "index.html"
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return HTMLResponse("<!doctype html><title>unmask</title><p>unmask is serving: see /v1/models.</p>")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(Gate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
                       allowed_hosts=settings.allowed_hosts)
    return app
