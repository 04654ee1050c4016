"""``unmask generate`` and ``unmask infill``: one decoding, its completion on stdout, its figures on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from unmask.commands import command
from unmask.commands.flags import add_decoding, add_device, add_healing, add_model, add_view, generation_config
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    command(subparsers, "generate", "complete a prompt by parallel unmasking", add_generate_arguments, main)
    command(subparsers, "infill", "write the middle between a prefix and a suffix", add_infill_arguments, main)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _add_decoding_run(p, max_new_tokens=64)


def add_infill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", required=True, help="the text before the gap")
    p.add_argument("--suffix", required=True, help="the text after the gap")
    _add_decoding_run(p, max_new_tokens=16)


def _add_decoding_run(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    add_model(p)
    add_decoding(p, max_new_tokens)
    add_device(p)
    add_view(p)
    add_healing(p)


def main(args: argparse.Namespace) -> None:
    from unmask.decoding import decode, infill

    if args.command == "infill":

        def fill(loaded, config, on_step, healed):
            if loaded.model.config.attention == AttentionMode.CAUSAL:
                raise UnmaskError("infill needs a diffusion model; this one is autoregressive")
            suffix = loaded.tokenizer.encode(args.suffix)
            return infill(loaded.model, [healed.ids], [suffix], config, on_step=on_step, heal=[healed.heal])

        run_decoding(args, args.prefix, fill)
        return
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise UnmaskError("no prompt: pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise UnmaskError("the prompt is empty")

    def complete(loaded, config, on_step, healed):
        return decode(loaded.model, [healed.ids], config, on_step=on_step, heal=[healed.heal])

    run_decoding(args, prompt, complete)


def run_decoding(args: argparse.Namespace, prompt_text: str, run: Callable) -> None:
    """Load the model, heal ``prompt_text`` (``--token-healing``), run ``run(loaded, config, on_step, healed)``,
    print the completion (what follows the prompt as typed) and the statistics."""
    from rich.console import Console

    from unmask.decoding import completion_text, heal
    from unmask.loading import load
    from unmask.view import LiveCanvas

    loaded = load(args.model, device=args.device)
    config = generation_config(args, loaded)
    healed = heal(loaded.tokenizer, loaded.tokenizer.encode(prompt_text), args.token_healing)
    visible_prefix = prompt_text if healed.heal is None else loaded.tokenizer.decode(healed.ids)  # the canvas re-spells a cut
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

            result = run(loaded, config, on_step, healed)
    else:
        result = run(loaded, config, None, healed)
    completion = completion_text(loaded.tokenizer, result.sequences[0], healed.heal)
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
