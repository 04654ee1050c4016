"""``unmask data build`` (source files -> token shards for `unmask train`) and ``data sft-pairs``
(functions -> SFT pairs, ``unmask.train.mine``) and ``data distill`` (those pairs answered by an AR
teacher, ``unmask.train.distill``)."""

from __future__ import annotations

import argparse

from unmask.commands import command, group
from unmask.commands.flags import bounded, positive_int


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    group(subparsers, "data", "training data tools", add_actions, dest="data_command", runs_model=False)


def add_actions(actions: argparse._SubParsersAction) -> None:
    from unmask.train import distill, mine

    command(actions, "build", "tokenise source files into memory-mapped token shards", add_build_arguments, main,
            runs_model=False)
    command(actions, "sft-pairs", "mine SFT pairs (docstring -> function) from Python files", mine.add_arguments, mine.main,
            runs_model=False)
    command(actions, "distill", "replace SFT answers with an AR teacher's greedy ones (sequence-level distillation)",
            distill.add_arguments, distill.main)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", help="files, directories, globs, .jsonl or .parquet files "
                   "(default: this Python's standard library and site-packages)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    p.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    p.add_argument("--workers", type=positive_int, help="tokenising processes (default: the usable CPUs)")
    p.add_argument("--val-fraction", type=bounded(float, 0.0, 0.99), default=0.02,
                   help="share of files held out for validation, chosen by content hash")
    p.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                   help="token id type in the shards; auto: uint16 when the vocabulary fits")
    p.add_argument("--suffix", action="append", help="file suffix to read in directories (default .py; repeatable)")
    p.add_argument("--text-field", default="text", help="field holding the text in JSONL records and Parquet rows")
    p.add_argument("--max-file-mb", type=bounded(float, 0.0, low_open=True), default=1.0,
                   help="skip documents larger than this")
    p.add_argument("--shard-mb", type=bounded(float, 0.0, low_open=True), default=32.0, help="source text per shard")
    p.add_argument("--max-files", type=positive_int, help="keep at most this many files (a uniform sample by hash)")


def main(args: argparse.Namespace) -> None:
    """``data build``; ``sft-pairs`` runs ``unmask.train.mine.main``."""
    import os

    from rich.console import Console
    from rich.table import Table

    from unmask.tokenizer import Tokenizer
    from unmask.train.build import BuildOptions, build_shards

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = args.workers or usable
    options = BuildOptions(
        val_fraction=args.val_fraction, workers=workers, suffixes=tuple(args.suffix or (".py",)),
        text_field=args.text_field, max_doc_bytes=int(args.max_file_mb * (1 << 20)),
        shard_bytes=int(args.shard_mb * (1 << 20)), max_files=args.max_files, dtype=args.dtype,
    )
    result = build_shards(args.sources, args.out, Tokenizer.from_dir(args.tokenizer), options)
    table = Table(title=f"token shards in {result.root}", show_header=False, box=None)
    for label, value in result.summary_rows():
        table.add_row(label, value)
    Console().print(table)
