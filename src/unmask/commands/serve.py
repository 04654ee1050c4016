"""``unmask serve``: the OpenAI-compatible HTTP server and the playground (``unmask.serve``).

The flags' defaults are those of ``LaunchOptions`` and ``ServeSettings``, and ``--cache`` /
``--cache-refresh`` are the declared decoding settings; the other decoding settings are request
fields, chosen per request.
"""

from __future__ import annotations

import argparse

from unmask.commands import command
from unmask.commands.flags import add_device, add_model, add_setting, bounded, chosen_model, positive_int


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    command(subparsers, "serve", "serve models over an OpenAI-compatible HTTP API with a playground", add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from unmask.serve import LaunchOptions as Launch, ServeSettings as Limits

    add_model(p, positional=True)
    p.add_argument("--ar-model", help="also serve this autoregressive model (for side-by-side races)")
    p.add_argument("--served-model-name", help="the first model's name in the API (default: its directory name)")
    p.add_argument("--host", default=Launch.host, help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=Launch.port, help="TCP port to listen on")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $UNMASK_API_KEY)")
    p.add_argument("--max-concurrency", type=positive_int, default=Launch.max_concurrency,
                   help="requests per model decoded in one batch")
    p.add_argument("--max-queue", type=bounded(int, 0), default=Launch.max_queue,
                   help="requests per model waiting for a slot; more get 429")
    p.add_argument("--max-model-len", type=positive_int, help="cap on prompt + answer tokens (default: the model's context)")
    add_setting(p, "cache", help="block KV cache of the running batch: approximate for bidirectional models, exact "
                "for block-causal ones")
    add_setting(p, "cache_refresh")
    p.add_argument("--max-n", type=positive_int, default=Limits.max_choices, help="most choices (n x prompts) per request")
    p.add_argument("--shutdown-timeout", type=bounded(float, 0.0, 3600.0), default=Limits.shutdown_timeout,
                   help="seconds in-flight requests get to finish on SIGTERM")
    add_device(p)
    p.add_argument("--log-level", default=Launch.log_level, choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also answer this Host header name (repeatable; '*' = any; default: the bound names)")


def main(args: argparse.Namespace) -> None:
    import os

    from unmask.serve import LaunchOptions, ServeSettings, run_server

    settings = ServeSettings(
        api_key=args.api_key or os.environ.get("UNMASK_API_KEY") or None,
        max_model_len=args.max_model_len,
        max_choices=args.max_n,
        shutdown_timeout=args.shutdown_timeout,
        allowed_hosts=(*ServeSettings().allowed_hosts, *(args.allow_host or ())),
    )
    options = LaunchOptions(
        model=chosen_model(args), ar_model=args.ar_model, served_model_name=args.served_model_name,
        host=args.host, port=args.port, device=args.device, max_concurrency=args.max_concurrency,
        max_queue=args.max_queue, cache=args.cache, cache_refresh=args.cache_refresh, log_level=args.log_level,
    )
    run_server(options, settings)
