"""``unmask pull ORG/NAME`` and ``unmask list``: the model cache (``unmask.hub``)."""

from __future__ import annotations

import argparse

from unmask.commands import command
from unmask.commands.flags import bounded


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    command(subparsers, "pull", "download a model from the Hugging Face Hub into the cache", add_pull_arguments, main,
            runs_model=False)
    command(subparsers, "list", "show the embedded model and the cached ones", add_list_arguments, main, runs_model=False)


def add_pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", metavar="ORG/NAME", help="Hub model id, e.g. GSAI-ML/LLaDA-8B-Instruct")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--timeout", type=bounded(float, 0.0, 600.0, low_open=True), default=5.0,
                   help="seconds to wait for the Hub before giving up")


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> None:
    from unmask.hub import entries_json, list_models, print_models, pull

    if args.command == "pull":
        print(pull(args.repo_id, revision=args.revision, timeout=args.timeout))
        return
    entries = list_models()
    if args.json:
        print(entries_json(entries))
        return
    print_models(entries)
