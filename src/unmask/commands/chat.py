"""``unmask chat``: a multi-turn conversation in the terminal (the loop is ``unmask.chat``)."""

from __future__ import annotations

import argparse

from unmask.commands import command
from unmask.commands.flags import add_decoding, add_device, add_model, add_view, chosen_model, generation_config
from unmask.errors import UnmaskError


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    command(subparsers, "chat", "talk to a model in the terminal with its chat template", add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, positional=True)
    p.add_argument("--system", help="system message opening the conversation")
    p.add_argument("--json", action="store_true", help="one JSON object per answer on stdout (for scripts)")
    add_decoding(p, max_new_tokens=128)
    add_device(p)
    add_view(p)


def main(args: argparse.Namespace) -> None:
    from unmask.chat import ChatOptions, run_chat
    from unmask.loading import load

    loaded = load(chosen_model(args), device=args.device)
    options = ChatOptions(show_steps=args.show_steps, frame_delay=args.frame_delay, quiet=args.quiet, json=args.json)
    failed = run_chat(loaded, generation_config(args, loaded), args.system, options)
    if failed:
        raise UnmaskError(f"{failed} turn{'s' if failed > 1 else ''} failed")
