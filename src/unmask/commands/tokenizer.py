"""``unmask tokenizer train``: a byte-level BPE tokenizer from source files (``unmask.tokenizer``)."""

from __future__ import annotations

import argparse
import sys

from unmask.commands import command, group
from unmask.commands.flags import bounded
from unmask.errors import UnmaskError


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    group(subparsers, "tokenizer", "tokenizer tools", add_actions, dest="tokenizer_command", runs_model=False)


def add_actions(actions: argparse._SubParsersAction) -> None:
    command(actions, "train", "train a byte-level BPE tokenizer on source files", add_train_arguments, main,
            runs_model=False)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="files, directories or globs")
    p.add_argument("--out", required=True, help="output directory for tokenizer.json")
    p.add_argument("--vocab-size", type=bounded(int, 300), default=4096, help="tokens in the vocabulary, specials included")
    p.add_argument("--suffix", action="append", help="file suffix to read in directories (default .py)")


def main(args: argparse.Namespace) -> None:
    from pathlib import Path

    from unmask.tokenizer import train_tokenizer
    from unmask.train.corpus import find_files, iter_texts

    suffixes = tuple(args.suffix) if args.suffix else (".py",)
    files = find_files(args.paths, suffixes)
    if not files:
        raise UnmaskError(f"no files with suffixes {suffixes} under {' '.join(args.paths)}")
    tokenizer = train_tokenizer((text for _, text in iter_texts(files)), vocab_size=args.vocab_size)
    out = Path(args.out)
    tokenizer.save(out)
    print(f"{out / 'tokenizer.json'}: {tokenizer.vocab_size} tokens from {len(files)} files", file=sys.stderr)
