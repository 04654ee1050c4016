"""The ``unmask`` command: a dispatcher over the command modules in ``unmask.commands``.

    unmask generate "def fib(n):" --show-steps
    unmask infill --prefix "def add(a, b):\n    " --suffix "\n" --max-new-tokens 16
    unmask train configs/tiny-cpu.toml
    unmask tokenizer train --vocab-size 4096 --out tok/ src/
    unmask data build --tokenizer tok/ --out data/ src/
    unmask info MODEL_DIR
    unmask pull GSAI-ML/LLaDA-8B-Instruct
    unmask list
    unmask chat GSAI-ML/LLaDA-8B-Instruct --steps 64
    unmask serve MODEL_DIR --port 8000
    unmask eval humaneval --limit 20 --json he.json

Each command module owns its flags and its work; a command's flags are built only when it is
chosen or its help is asked for (``Parser``), so ``unmask --help`` and ``--version`` import no
torch. Only the completion goes to stdout, so output pipes cleanly; progress, the live view and
statistics go to stderr. User mistakes print one line and exit with status 1 (2 for bad flags).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from unmask import __version__
from unmask.commands import bench, chat, data, evaluate, generate, hub, model, serve, tokenizer, train
from unmask.errors import UnmaskError

MODULES = (generate, chat, serve, bench, evaluate, data, train, tokenizer, model, hub)  # in `unmask --help`'s order


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help where it has a default the text does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        if isinstance(action.default, tuple):
            return text + " (default: " + ",".join(map(str, action.default)) + ")"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every (sub)command parser: defaults shown in help, and arguments added on first use.

    ``setup(parser)`` runs when the parser first parses or writes its help or usage, so building
    the whole tree costs one ``add_parser`` per command and no command module's heavy imports.
    """

    def __init__(self, *args: Any, setup: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._setup = setup

    def ready(self) -> Parser:
        """Add this parser's arguments now, if they are not there yet."""
        setup, self._setup = self._setup, None
        if setup is not None:
            setup(self)
        return self

    def complete(self) -> Parser:
        """This parser and every subcommand's, all ready (for tests and documentation)."""
        for action in self.ready()._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    sub.complete()
        return self

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        self.ready()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.ready()
        return super().format_usage()

    def format_help(self) -> str:
        self.ready()
        return super().format_help()


def build_parser(*, complete: bool = False) -> Parser:
    """The ``unmask`` parser; ``complete`` builds every command's arguments at once instead of on use."""
    parser = Parser(prog="unmask", description="Diffusion language models: train, decode, serve, measure.")
    parser.add_argument("--version", action="version", version=f"unmask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in MODULES:
        module.setup_arg_parser(sub)
    return parser.complete() if complete else parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.runs_model:
            from unmask import threads

            threads.configure()
        args.main(args)
    except UnmaskError as exc:
        print(f"unmask: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("unmask: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
