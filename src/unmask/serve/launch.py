"""``unmask serve``: load the models, give each an engine, run the app under uvicorn.

SIGTERM / Ctrl-C: uvicorn stops accepting connections and the engines stop taking requests at
once; running and waiting requests get ``shutdown_timeout`` seconds to finish, then the rest are
aborted (their streams end with an error event) and the process exits.
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

import uvicorn

from unmask.decoding.settings import SETTING
from unmask.engine import MAX_BATCH, MAX_QUEUE, Engine
from unmask.errors import UnmaskError
from unmask.hub import DEFAULT_NAME
from unmask.loading import LoadedModel, load
from unmask.models.config import AttentionMode
from unmask.serve.app import create_app
from unmask.serve.settings import ServedModel, ServeSettings



@dataclass
class LaunchOptions:
    """What `unmask serve` was asked for."""

    model: str | None = None  # model directory; None = the embedded default
    ar_model: str | None = None  # optional second (autoregressive) model directory
    served_model_name: str | None = None  # name of the first model in the API
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # cpu, cuda, cuda:1 or auto
    max_concurrency: int = MAX_BATCH
    max_queue: int = MAX_QUEUE
    cache: str | None = None  # block KV cache of the diffusion model's running batch: none | prefix | dual; None = the model's decoding.json, else none
    cache_refresh: int | None = None  # with a cache: recompute everything every this many steps
    log_level: str = "info"


def serve_model(name: str, loaded: LoadedModel, max_model_len: int | None = None, max_concurrency: int = MAX_BATCH,
                max_queue: int = MAX_QUEUE, cache: str | None = None, cache_refresh: int | None = None) -> ServedModel:
    """Wrap a loaded model with an engine (not started yet) under ``name``; context capped at ``max_model_len``;
    ``cache`` None: the model's ``decoding.json`` says, else none."""
    context = loaded.model.config.max_seq_len
    if cache is None:
        cache = loaded.decoding.cache or SETTING["cache"].default
    engine = Engine(loaded.model, max_batch=max_concurrency, max_queue=max_queue, cache=cache, cache_refresh=cache_refresh)
    return ServedModel(name, loaded, engine, min(context, max_model_len or context))


def _default_name(given: str | None) -> str:
    """A directory's own name; a cached or Hub name as given; the embedded model as ``unmask list`` names it."""
    if given is None:
        return DEFAULT_NAME
    path = Path(given).expanduser()
    return path.resolve().name if path.is_dir() else given


def load_served(options: LaunchOptions, settings: ServeSettings) -> dict[str, ServedModel]:
    """Load the model (and the AR model, if any) and name them."""
    main = load(options.model, device=options.device)
    name = options.served_model_name or _default_name(options.model)
    limit, context = settings.max_model_len, main.model.config.max_seq_len
    if limit is not None and limit > context:
        raise UnmaskError(f"--max-model-len {limit} exceeds the model's context of {context} tokens")
    served = {name: serve_model(name, main, limit, options.max_concurrency, options.max_queue,
                                options.cache, options.cache_refresh)}
    if options.ar_model is not None:
        ar = load(options.ar_model, device=options.device)
        if ar.model.config.attention != AttentionMode.CAUSAL:
            print(f"unmask: note: --ar-model {options.ar_model} is {ar.model.config.attention}, not causal",
                  file=sys.stderr)
        ar_name = _default_name(options.ar_model)
        if ar_name in served:
            ar_name += "-ar"
        served[ar_name] = serve_model(ar_name, ar, limit, options.max_concurrency, options.max_queue)
    return served


def host_names(host: str, settings: ServeSettings) -> tuple[str, ...]:
    """The Host header names the server answers: loopback names, the bound address, the allowed ones.

    Bound to every interface (0.0.0.0, ::), it also answers this machine's own host name."""
    names = list(settings.allowed_hosts)
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(host)
    return tuple(dict.fromkeys(n for n in names if n))


def run_server(options: LaunchOptions, settings: ServeSettings) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    settings = replace(settings, allowed_hosts=host_names(options.host, settings))
    served = load_served(options, settings)
    app = create_app(served, settings)
    names = ", ".join(f"{n} ({s.attention}, context {s.max_len})" for n, s in served.items())
    print(f"unmask: serving {names} at http://{options.host}:{options.port}", file=sys.stderr)
    if settings.api_key is None and options.host not in ("127.0.0.1", "localhost", "::1"):
        print("unmask: warning: listening beyond loopback without --api-key", file=sys.stderr)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        # a backstop: the engines end every request within shutdown_timeout, which closes the streams
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,
    )
    server = _DrainingServer(config, [s.engine for s in served.values()], settings.shutdown_timeout)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
        if server.started:
            raise
    if not server.started:
        raise UnmaskError(f"could not listen on {options.host}:{options.port} (see the line above)")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, plus: the first SIGTERM/SIGINT also starts draining the engines at once.

    The engines stop taking requests, let running ones finish and abort the rest at the timeout,
    so open streams end with an error event instead of being cut when uvicorn gives up on them.
    """

    def __init__(self, config: uvicorn.Config, engines: list[Engine], timeout: float) -> None:
        super().__init__(config)
        self.engines, self.timeout, self.draining = engines, timeout, False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.draining:
            self.draining = True
            for engine in self.engines:
                threading.Thread(target=engine.shutdown_sync, args=(self.timeout,), daemon=True).start()
        super().handle_exit(sig, frame)
