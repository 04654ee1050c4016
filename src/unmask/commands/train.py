"""``unmask train CONFIG.toml``: one process, or ``--nproc-per-node`` of them under torchrun (``unmask.train``)."""

from __future__ import annotations

import argparse

from unmask.commands import command
from unmask.commands.flags import positive_int


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    command(subparsers, "train", "train a model from a TOML config", add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config (TOML)")
    p.add_argument("--steps", type=positive_int, help="override [train] steps")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    p.add_argument(
        "--nproc-per-node", type=positive_int,
        help="launch this many processes with torchrun (DDP, or FSDP2 with [train] parallel = \"fsdp\")",
    )


def main(args: argparse.Namespace) -> None:
    import os

    from unmask.train.trainer import run_training

    if args.nproc_per_node and "WORLD_SIZE" not in os.environ:
        from torch.distributed.run import main as torchrun

        rest = [args.config] + (["--steps", str(args.steps)] if args.steps else []) + (["--fresh"] if args.fresh else [])
        torchrun(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "unmask", "train", *rest])
        return
    overrides = {"train": {"steps": args.steps}} if args.steps else None
    final = run_training(args.config, overrides=overrides, resume=not args.fresh)
    if os.environ.get("RANK", "0") == "0":
        print(final)
