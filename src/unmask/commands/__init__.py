"""The ``unmask`` commands, one module each (two where they share their work); ``unmask.cli`` lists them.

Every module exposes ``setup_arg_parser(subparsers)``, which registers its command(s) with
``command`` (or a group of them, ``unmask eval ppl``, with ``group``), and ``main(args)``, which
runs one. Modules import only argparse and ``unmask.commands.flags`` at the top; what a command
needs (torch, the model, the server) is imported when its flags are built or when it runs, so
listing the commands costs nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def command(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    main: Callable[[argparse.Namespace], Any],
    *,
    runs_model: bool = True,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Register ``name``. ``add_arguments`` runs only when the command is chosen or its help is asked
    for (see ``unmask.cli.Parser``); ``runs_model`` False leaves torch's thread count alone."""
    parser = subparsers.add_parser(name, help=help, description=description or help, setup=add_arguments)
    parser.set_defaults(main=main, runs_model=runs_model)
    return parser


def group(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    add_actions: Callable[[argparse._SubParsersAction], None],
    *,
    dest: str,
    metavar: str = "ACTION",
    runs_model: bool = True,
) -> argparse.ArgumentParser:
    """Register ``name`` as a group of subcommands (``unmask data build``): ``add_actions`` registers them
    with ``command`` on the group's own subparsers, when the group is first used."""

    def setup(parser: argparse.ArgumentParser) -> None:
        add_actions(parser.add_subparsers(dest=dest, required=True, metavar=metavar))

    parser = subparsers.add_parser(name, help=help, description=help, setup=setup)
    parser.set_defaults(runs_model=runs_model)
    return parser
