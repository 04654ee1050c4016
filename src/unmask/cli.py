"""The ``unmask`` command: a thin layer over the package's modules.

    unmask generate "def fib(n):" --show-steps
    unmask infill --prefix "def add(a, b):\n    " --suffix "\n" --max-new-tokens 16
    unmask train configs/tiny-cpu.toml
    unmask tokenizer train --vocab-size 4096 --out tok/ src/
    unmask info MODEL_DIR

Only the completion goes to stdout, so output pipes cleanly; progress, the live view and
statistics go to stderr. User mistakes print one line and exit with status 1 (2 for bad flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from unmask import __version__
from unmask.decoding.policies import POLICIES
from unmask.errors import UnmaskError

DEFAULT_BLOCK = 32


def _bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable:
    """An argparse type that parses ``kind`` and checks it lies in the given range."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


positive_int = _bounded(int, 1)


def _add_decoding_flags(p: argparse.ArgumentParser, default_tokens: int) -> None:
    p.add_argument("--model", help="model directory (default: the embedded model)")
    p.add_argument("--max-new-tokens", type=positive_int, default=default_tokens, help="length of the canvas")
    p.add_argument("--steps", type=positive_int, help="total denoising steps (default: one token per step)")
    p.add_argument("--threshold", type=_bounded(float, 0.0, 1.0), help="confidence threshold (selects --policy threshold)")
    p.add_argument(
        "--block-size", type=positive_int,
        help=f"semi-autoregressive block length (default: the model's block for block-causal models, else {DEFAULT_BLOCK})",
    )
    p.add_argument("--policy", choices=POLICIES, help="which predictions to commit each step (default: confidence)")
    p.add_argument("--temperature", type=_bounded(float, 0.0, 2.0), default=0.0)
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--show-steps", action="store_true", help="animate the denoising on the terminal (stderr)")
    p.add_argument(
        "--frame-delay", type=_bounded(float, 0.0, 10.0), default=0.04,
        help="with --show-steps: seconds each frame stays on screen (not counted in tokens/s)",
    )
    p.add_argument("--quiet", action="store_true", help="no statistics on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unmask", description="Diffusion language models: train, decode, inspect.")
    parser.add_argument("--version", action="version", version=f"unmask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete a prompt by parallel unmasking")
    gen.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _add_decoding_flags(gen, default_tokens=64)

    inf = sub.add_parser("infill", help="write the middle between a prefix and a suffix")
    inf.add_argument("--prefix", required=True)
    inf.add_argument("--suffix", required=True)
    _add_decoding_flags(inf, default_tokens=16)

    train = sub.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config", help="training config (TOML)")
    train.add_argument("--steps", type=positive_int, help="override [train] steps")
    train.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok_train = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer on source files")
    tok_train.add_argument("paths", nargs="+", help="files, directories or globs")
    tok_train.add_argument("--out", required=True, help="output directory for tokenizer.json")
    tok_train.add_argument("--vocab-size", type=_bounded(int, 300), default=4096)
    tok_train.add_argument("--suffix", action="append", help="file suffix to read in directories (default .py)")

    info = sub.add_parser("info", help="describe a model directory")
    info.add_argument("model", nargs="?", help="model directory (default: the embedded model)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def _generation_config(args: argparse.Namespace, model_config):
    from unmask.decoding import GenerationConfig

    block = args.block_size
    if block is None:
        block = model_config.block_size if model_config.attention == "block" else DEFAULT_BLOCK
    policy = args.policy or ("threshold" if args.threshold is not None else "confidence")
    if args.threshold is not None and policy != "threshold":
        raise UnmaskError(f"--threshold applies to --policy threshold, not {policy}")
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        block_size=block,
        steps=args.steps,
        policy=policy,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.threshold is not None:
        config.threshold = args.threshold
    return config


def _run_decoding(args: argparse.Namespace, prompt_text: str, run: Callable, visible_prefix: str) -> None:
    """Load the model, run ``run(loaded, config, on_step)``, print the completion and the statistics."""
    from rich.console import Console

    from unmask.loading import load
    from unmask.view import LiveCanvas

    loaded = load(args.model, device=args.device)
    config = _generation_config(args, loaded.model.config)
    err = Console(stderr=True)
    mask_id = loaded.model.config.mask_token_id
    view_seconds = 0.0
    if args.show_steps and mask_id is not None:
        with LiveCanvas(loaded.tokenizer, mask_id, prompt=visible_prefix, console=err) as live:

            def on_step(event) -> None:
                nonlocal view_seconds
                began = time.perf_counter()
                fresh = event.committed[0].tolist()
                live.frame(event.canvas[0].tolist(), fresh, f"step {event.step + 1} · {event.nfe} forward passes")
                time.sleep(args.frame_delay)
                view_seconds += time.perf_counter() - began

            result = run(loaded, config, on_step)
    else:
        result = run(loaded, config, None)
    completion = loaded.tokenizer.decode(result.sequences[0])
    sys.stdout.write(completion if completion.endswith("\n") else completion + "\n")
    sys.stdout.flush()
    if not args.quiet:
        tokens = len(result.sequences[0])
        compute = result.elapsed - view_seconds
        rate = tokens / compute if compute > 0 else float("inf")
        err.print(
            f"[dim]{tokens} tokens · NFE {result.nfe} · {result.tokens_per_forward:.2f} tokens/forward · "
            f"{rate:.1f} tokens/s · finish: {result.finish_reasons[0]}[/dim]",
            highlight=False,
        )


def cmd_generate(args: argparse.Namespace) -> None:
    from unmask.decoding import decode

    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise UnmaskError("no prompt: pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise UnmaskError("the prompt is empty")

    def run(loaded, config, on_step):
        ids = loaded.tokenizer.encode(prompt)
        return decode(loaded.model, [ids], config, on_step=on_step)

    _run_decoding(args, prompt, run, visible_prefix=prompt)


def cmd_infill(args: argparse.Namespace) -> None:
    from unmask.decoding import infill

    def run(loaded, config, on_step):
        if loaded.model.config.attention == "causal":
            raise UnmaskError("infill needs a diffusion model; this one is autoregressive")
        tok = loaded.tokenizer
        return infill(loaded.model, [tok.encode(args.prefix)], [tok.encode(args.suffix)], config, on_step=on_step)

    _run_decoding(args, args.prefix, run, visible_prefix=args.prefix)


def cmd_train(args: argparse.Namespace) -> None:
    from unmask.train.trainer import run_training

    overrides = {"train": {"steps": args.steps}} if args.steps else None
    final = run_training(args.config, overrides=overrides, resume=not args.fresh)
    print(final)


def cmd_tokenizer(args: argparse.Namespace) -> None:
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


def cmd_info(args: argparse.Namespace) -> None:
    from unmask.loading import load

    loaded = load(args.model, device="cpu")
    cfg = loaded.model.config
    facts = {
        "path": str(loaded.path),
        "parameters": loaded.model.num_params(),
        "attention": cfg.attention,
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "heads": f"{cfg.n_heads} query / {cfg.n_kv_heads} key-value",
        "context": cfg.max_seq_len,
        "vocab": cfg.vocab_size,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "shifted_logits": cfg.shifted,
        "training": loaded.training,
    }
    if cfg.attention == "block":
        facts["block_size"] = cfg.block_size
    if args.json:
        print(json.dumps(facts, indent=2))
        return
    for key, value in facts.items():
        if key == "training":
            for k, v in (value or {}).items():
                print(f"training.{k}: {v}")
        else:
            print(f"{key}: {value}")


COMMANDS = {
    "generate": cmd_generate,
    "infill": cmd_infill,
    "train": cmd_train,
    "tokenizer": cmd_tokenizer,
    "info": cmd_info,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
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
