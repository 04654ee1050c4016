"""``unmask eval ppl|humaneval|infill|syntax``: each prints a table and, with --json, writes the full record."""

from __future__ import annotations

import argparse
from functools import partial

from unmask.commands import command, group
from unmask.commands.flags import add_decoding, add_device, add_healing, add_model, bounded, generation_config, positive_int

# The metrics that decode, with what each measures and its default canvas.
DECODING_METRICS = (
    ("humaneval", "pass@1 on the 164 HumanEval problems, run in a sandbox", 128),
    ("infill", "single- and multi-line infilling of HumanEval's canonical solutions", 16),
    ("syntax", "share of completions of held-out function headers that parse", 128),
)


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    group(subparsers, "eval", "measure a model: perplexity, HumanEval, infilling, syntax validity", add_metrics,
          dest="eval_command", metavar="METRIC")


def add_metrics(metrics: argparse._SubParsersAction) -> None:
    command(metrics, "ppl", "held-out perplexity: ELBO bound (diffusion) and exact (AR), same tokens", add_ppl_arguments, main)
    for name, text, tokens in DECODING_METRICS:
        note = "; each hole gets a canvas of 1.5x its true length (--max-new-tokens is not used)" if name == "infill" else ""
        add = partial(add_decoding_metric_arguments, name=name, tokens=tokens)
        command(metrics, name, text, add, main, description=text + note)


def add_ppl_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--ar-model", help="also score this model (the AR twin) on the same tokens")
    p.add_argument("--seq-len", type=positive_int, help="tokens per window (default: the smallest context)")
    p.add_argument("--samples", type=positive_int, default=4, help="diffusion times per window")
    add_device(p)
    _add_common(p, data=True)


def add_decoding_metric_arguments(p: argparse.ArgumentParser, name: str, tokens: int) -> None:
    add_model(p)
    add_decoding(p, max_new_tokens=tokens)
    add_device(p)
    if name != "syntax":
        p.add_argument("--workers", type=positive_int, default=2, help="programs run at once in the sandbox")
        p.add_argument("--timeout", type=bounded(float, 0.0, 600.0, low_open=True), default=5.0, help="seconds per program")
        p.add_argument("--memory-mb", type=bounded(int, 64), default=1024, help="address-space limit per program")
    add_healing(p)
    if name == "humaneval":
        p.add_argument("--raw-prompts", action="store_true",
                       help="give the prompts as shipped, trailing newline included (default: without it)")
    if name == "infill":
        p.add_argument("--tokens-per-step", type=positive_int,
                       help="give each hole ceil(length / K) steps (instead of --steps, which is the same for every hole)")
    _add_common(p, data=name == "syntax")


def _add_common(p: argparse.ArgumentParser, data: bool) -> None:
    p.add_argument("--limit", type=positive_int, help="evaluate only this many items (windows, problems, headers)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    p.add_argument("--json", metavar="PATH", help="also write the full record (every item) as JSON")
    if data:
        p.add_argument("--data", nargs="+", metavar="PATH",
                       help="held-out data: shard directory, .npy tokens or source files (default: the model's validation split)")


def main(args: argparse.Namespace) -> None:
    from unmask.eval import humaneval, infill, perplexity, syntax
    from unmask.eval.heldout import heldout_tokens
    from unmask.eval.report import show, write_json
    from unmask.eval.sandbox import Limits
    from unmask.loading import load

    loaded = load(args.model, device=args.device)
    if args.eval_command == "ppl":
        models = [loaded] + ([load(args.ar_model, device=args.device)] if args.ar_model else [])
        perplexity.check_same_tokenizer(models)
        tokens, source = heldout_tokens(loaded.tokenizer, loaded.training, args.data)
        report = perplexity.evaluate_models(
            models, tokens, source, seq_len=args.seq_len, limit=args.limit, samples=args.samples, batch_size=args.batch_size
        )
    else:
        config = generation_config(args, loaded)
        common = {"limit": args.limit, "batch_size": args.batch_size, "token_healing": args.token_healing}
        if args.eval_command == "syntax":
            report = syntax.evaluate(loaded, config, data=args.data, seed=args.seed, **common)
        else:
            limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
            if args.eval_command == "humaneval":
                module, extra = humaneval, {"raw_prompts": args.raw_prompts}
            else:
                module, extra = infill, {"seed": args.seed, "tokens_per_step": args.tokens_per_step}
            report = module.evaluate(loaded, config, workers=args.workers, limits=limits, **common, **extra)
    show(report)
    if args.json:
        write_json(report, args.json)
