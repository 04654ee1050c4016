"""``unmask bench``: time diffusion decoding settings against AR decoding (the timing is ``unmask.bench``).

This module reads the flags, builds or loads the models and the prompts, and prints the table;
``--agreement`` measures instead how often the block caches change greedy outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from unmask.commands import command
from unmask.commands.flags import MODEL_HELP, add_device, add_setting, bounded, parsed, positive_int
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    command(subparsers, "bench", "time diffusion decoding settings against AR decoding", add_arguments, main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from unmask.bench import SHAPES, THRESHOLDS, TOKENS_PER_STEP
    from unmask.decoding.defaults import DEFAULT_BLOCK

    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", help=f"diffusion {MODEL_HELP} (default: the embedded model)")
    source.add_argument("--shapes", help=f"random weights of a published shape built on the device: {', '.join(SHAPES)}")
    p.add_argument("--ar-model", help="AR model (default: the diffusion model's weights read causally, for speed only)")
    p.add_argument("--batch", type=bounded(int, 1, 64), default=1, help="sequences decoded together")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens per sequence")
    p.add_argument("--gen", type=positive_int, default=256, help="tokens generated per sequence")
    p.add_argument("--block", type=positive_int, default=DEFAULT_BLOCK, help="diffusion block length")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per setting (after one warm-up)")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on the CPU")
    add_device(p)
    p.add_argument("--only", choices=("all", "diffusion", "ar", "fast", "fast-ar"), default="all",
                   help="time one kind of setting only (fast: the static-shape paths)")
    p.add_argument("--tpf", type=_int_list, default=TOKENS_PER_STEP, help="tokens per step to time, e.g. 1,4,8")
    p.add_argument("--thresholds", type=_threshold_list, default=THRESHOLDS,
                   help="threshold-policy settings to time, e.g. 0.9,0.7, or 'none' (random weights are never confident)")
    p.add_argument("--agreement", type=positive_int, metavar="N",
                   help="instead of timing: how often the block caches change greedy outputs, on N held-out prompts")
    add_setting(p, "cache_refresh", help="with --agreement: the caches' refresh interval, N steps")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(positive_int(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _threshold_list(text: str) -> tuple[float, ...]:
    from unmask.decoding.settings import SETTING

    if text.strip().lower() == "none":
        return ()
    threshold = parsed(float, SETTING["threshold"].problem)
    return tuple(threshold(part) for part in text.split(",") if part.strip())


def main(args: argparse.Namespace) -> None:
    import torch

    from unmask import bench
    from unmask.loading import load, resolve_device

    device = resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    max_len = args.prompt_len + args.gen
    tokenizer = None
    if args.shapes:
        model = bench.random_model(args.shapes, device, dtype, max_len)
        name = f"{args.shapes} (random weights)"
        prompts = bench.synthetic_prompts(model.config.vocab_size, args.batch, args.prompt_len)
    else:
        loaded = load(args.model, device=args.device, dtype=dtype)
        model, name, tokenizer = loaded.model, str(loaded.path), loaded.tokenizer
        prompts = bench.source_prompts(tokenizer, args.batch, args.prompt_len)
    if max_len > model.config.max_seq_len:
        raise UnmaskError(f"--prompt-len + --gen = {max_len} exceeds the model's context of {model.config.max_seq_len}")
    ar = bench.as_autoregressive(model) if model.config.attention != AttentionMode.CAUSAL else model
    if args.ar_model:
        ar = load(args.ar_model, device=args.device, dtype=dtype).model
        if ar.config.attention != AttentionMode.CAUSAL:
            raise UnmaskError(f"--ar-model {args.ar_model} is not autoregressive (attention {ar.config.attention})")
    if args.agreement:
        if tokenizer is not None:
            prompts = bench.heldout_prompts(tokenizer, args.agreement, args.prompt_len)
        _agreement(args, model, prompts[: args.agreement], name)
        return
    _timings(args, model, ar, prompts, name)


def _timings(args: argparse.Namespace, model, ar, prompts: list[list[int]], name: str) -> None:
    from contextlib import nullcontext

    from rich.console import Console
    from rich.table import Table

    from unmask import bench

    settings = [s for s in bench.default_settings(args.gen, args.block, args.tpf, args.thresholds) if args.only in ("all", s.kind)]
    console = Console(stderr=True)
    table = Table(title=f"unmask bench · {name}", title_justify="left")
    for column in ("setting", "NFE", "tok/fwd", "ms/fwd", "tok/s", "x floor"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    with console.status("timing...") if console.is_terminal else nullcontext():
        report = bench.run_bench(model, ar, prompts, settings, repeats=args.repeats, model_name=name)
    for row in report["rows"]:
        table.add_row(
            row["label"], f"{row['nfe']:.0f}", f"{row['tokens_per_forward']:.2f}", f"{row['ms_per_forward']:.2f}",
            f"{row['tokens_per_s']:.1f}", f"{row['floor_multiple']:.2f}",
        )
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    console.print(
        f"[dim]{report['device']} · torch {report['torch']} · {report['dtype']} · {report['params'] / 1e6:.1f}M params · "
        f"batch {report['batch']} · prompt {report['prompt_len']} · gen {report['gen_len']} · block {report['block']} · "
        f"bandwidth {report['bandwidth_gb_s']:.0f} GB/s · weight-read floor {report['floor_ms']:.3f} ms[/dim]",
        highlight=False,
    )
    _write_json(args.json, report)


def _agreement(args: argparse.Namespace, model, prompts: list[list[int]], name: str) -> None:
    """Prompts decoded with and without each block cache (from unmask's own sources for a real model)."""
    from rich.console import Console
    from rich.table import Table

    from unmask import bench

    rows = bench.cache_agreement(model, prompts, args.gen, args.block, args.tpf, args.cache_refresh)
    table = Table(title=f"block-cache agreement with uncached greedy decoding · {name}", title_justify="left")
    for column in ("tokens/step", "cache", "token agreement", "identical outputs"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["tokens_per_step"]), row["cache"], f"{row['token_agreement']:.1%}", f"{row['exact']:.1%}")
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    _write_json(args.json, {"model": name, "prompts": len(prompts), "prompt_len": args.prompt_len,
                            "gen_len": args.gen, "block": args.block, "rows": rows})


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
