"""The ``unmask`` command: a thin layer over the package's modules.

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

Only the completion goes to stdout, so output pipes cleanly; progress, the live view and
statistics go to stderr. User mistakes print one line and exit with status 1 (2 for bad flags).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unmask import __version__
from unmask.errors import UnmaskError

# Commands that run no model: torch's thread count is left alone (and torch is not imported for it).
TORCH_FREE = frozenset({"pull", "list", "tokenizer", "data"})


class _Later:
    """A value from a module imported only when argparse first uses it (checking a flag, writing a
    command's help): building the parser, and so `unmask --help` and `--version`, imports no torch.
    As ``choices`` it behaves as the container; as an action attribute it fills ``%(name)s`` in help."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def value(self) -> Any:
        return getattr(importlib.import_module(self.module), self.name)

    def __iter__(self):
        return iter(self.value())

    def __contains__(self, item: object) -> bool:
        return item in self.value()

    def __str__(self) -> str:
        return str(self.value())


POLICY_NAMES = _Later("unmask.decoding.policies", "POLICIES")
DEFAULT_BLOCK = _Later("unmask.decoding.defaults", "DEFAULT_BLOCK")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help where it has a default the text does not already give."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        if isinstance(action.default, tuple):
            return text + " (default: " + ",".join(map(str, action.default)) + ")"
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command parser: defaults shown in help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


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
    p.add_argument("--model", help="model directory, GGUF file or name: default, default-ar, smollm2-135m, coder-nano-cpu, "
                   "a cached ORG/NAME (default: the embedded model)")
    p.add_argument("--max-new-tokens", type=positive_int, default=default_tokens, help="length of the canvas")
    p.add_argument("--steps", type=positive_int,
                   help="total denoising steps (default: the model's decoding.json, else one token per step)")
    p.add_argument("--threshold", type=_bounded(float, 0.0, 1.0), help="confidence threshold (selects --policy threshold)")
    block = p.add_argument(
        "--block-size", type=positive_int,
        help="semi-autoregressive block length (default: a block-causal model's own block, else the model's "
             "decoding.json, else %(fallback)s)",
    )
    block.fallback = DEFAULT_BLOCK  # read when the help is written
    p.add_argument("--policy", choices=POLICY_NAMES, metavar="POLICY",
                   help="which predictions to commit each step, one of %(choices)s "
                        "(default: the model's decoding.json, else confidence)")
    p.add_argument("--temperature", type=_bounded(float, 0.0, 2.0), default=0.0,
                   help="sampling temperature; 0 takes the most likely token")
    p.add_argument("--top-k", type=positive_int, help="sample among the K most likely tokens only (default: all)")
    p.add_argument("--top-p", type=_bounded(float, 0.0, 1.0, low_open=True),
                   help="sample among the most likely tokens that together hold probability P (default: 1, all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of sampling and of the random policies")
    p.add_argument(
        "--cache", choices=("none", "prefix", "dual"),
        help="block KV cache: approximate for bidirectional models, exact for block-causal ones "
             "(default: the model's decoding.json, else none)",
    )
    p.add_argument("--cache-refresh", type=positive_int, help="with --cache: recompute the whole canvas every N steps")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--show-steps", action="store_true", help="animate the denoising on the terminal (stderr)")
    p.add_argument(
        "--frame-delay", type=_bounded(float, 0.0, 10.0), default=0.04,
        help="with --show-steps: seconds each frame stays on screen (not counted in tokens/s)",
    )
    p.add_argument("--quiet", action="store_true", help="no statistics on stderr")


def _add_healing_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-healing", action=argparse.BooleanOptionalAction, default=True,
        help="back the prompt up to a token boundary the tokenizer keeps and make the output start with the "
        "removed text (default: on)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="unmask", description="Diffusion language models: train, decode, serve, measure.")
    parser.add_argument("--version", action="version", version=f"unmask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete a prompt by parallel unmasking")
    gen.add_argument("prompt", nargs="?", help="the prompt (default: read stdin)")
    _add_decoding_flags(gen, default_tokens=64)
    _add_healing_flag(gen)

    inf = sub.add_parser("infill", help="write the middle between a prefix and a suffix")
    inf.add_argument("--prefix", required=True, help="the text before the gap")
    inf.add_argument("--suffix", required=True, help="the text after the gap")
    _add_decoding_flags(inf, default_tokens=16)
    _add_healing_flag(inf)

    train = sub.add_parser("train", help="train a model from a TOML config")
    train.add_argument("config", help="training config (TOML)")
    train.add_argument("--steps", type=positive_int, help="override [train] steps")
    train.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    train.add_argument(
        "--nproc-per-node", type=positive_int,
        help="launch this many processes with torchrun (DDP, or FSDP2 with [train] parallel = \"fsdp\")",
    )

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    tok_train = tok_sub.add_parser("train", help="train a byte-level BPE tokenizer on source files")
    tok_train.add_argument("paths", nargs="+", help="files, directories or globs")
    tok_train.add_argument("--out", required=True, help="output directory for tokenizer.json")
    tok_train.add_argument("--vocab-size", type=_bounded(int, 300), default=4096, help="tokens in the vocabulary, specials included")
    tok_train.add_argument("--suffix", action="append", help="file suffix to read in directories (default .py)")

    info = sub.add_parser("info", help="describe a model directory")
    info.add_argument("model", nargs="?", help="model directory (default: the embedded model)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    _add_model_commands(sub)
    export = sub.add_parser("export", help="write a model as a GGUF file that llama.cpp runs")
    export.add_argument("model_name", nargs="?", metavar="MODEL", help="model directory, GGUF file or name (default: the embedded model)")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    export.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32", help="weight type (norms stay f32)")
    _add_serve_command(sub)
    _add_data_command(sub)
    _add_bench_command(sub)
    _add_eval_commands(sub)
    _describe_commands(parser)
    return parser


def _describe_commands(parser: argparse.ArgumentParser) -> None:
    """Each command's one-line help also heads its own --help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                command = action.choices[choice.dest]
                if command.description is None:
                    command.description = choice.help
                _describe_commands(command)


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(positive_int(part) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    return tuple(_bounded(float, 0.0, 1.0)(part) for part in text.split(",") if part.strip())


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    """`bench`: diffusion settings against AR decoding, with the weight-read floor."""
    bench = sub.add_parser("bench", help="time diffusion decoding settings against AR decoding")
    source = bench.add_mutually_exclusive_group()
    source.add_argument("--model", help="diffusion model directory (default: the embedded model)")
    source.add_argument("--shapes", help="random weights of a published shape built on the device: llada-8b, dream-7b, coder-nano, tiny")
    bench.add_argument("--ar-model", help="AR model directory (default: the diffusion model's weights read causally, for speed only)")
    bench.add_argument("--batch", type=_bounded(int, 1, 64), default=1, help="sequences decoded together")
    bench.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens per sequence")
    bench.add_argument("--gen", type=positive_int, default=256, help="tokens generated per sequence")
    bench.add_argument("--block", type=positive_int, default=32, help="diffusion block length")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed runs per setting (after one warm-up)")
    bench.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                       help="auto: bfloat16 on CUDA, float32 on the CPU")
    bench.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    bench.add_argument("--only", choices=("all", "diffusion", "ar", "fast", "fast-ar"), default="all",
                       help="time one kind of setting only (fast: the static-shape paths)")
    bench.add_argument("--tpf", type=_int_list, default=(1, 2, 4, 8), help="tokens per step to time, e.g. 1,4,8")
    bench.add_argument("--thresholds", type=_float_list, default=(0.9, 0.7),
                       help="threshold-policy settings to time, e.g. 0.9,0.7, or 'none' (random weights are never confident)")
    bench.add_argument("--agreement", type=positive_int, metavar="N",
                       help="instead of timing: how often the block caches change greedy outputs, on N held-out prompts")
    bench.add_argument("--cache-refresh", type=positive_int, help="with --agreement: the caches' refresh interval")
    bench.add_argument("--json", metavar="PATH", help="also write the report as JSON")


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    """`eval ppl|humaneval|infill|syntax`: each prints a table and, with --json, writes the full record."""
    ev = sub.add_parser("eval", help="measure a model: perplexity, HumanEval, infilling, syntax validity")
    metrics = ev.add_subparsers(dest="eval_command", required=True, metavar="METRIC")
    ppl = metrics.add_parser("ppl", help="held-out perplexity: ELBO bound (diffusion) and exact (AR), same tokens")
    ppl.add_argument("--model", help="model directory or cached name (default: the embedded model)")
    ppl.add_argument("--ar-model", help="also score this model (the AR twin) on the same tokens")
    ppl.add_argument("--seq-len", type=positive_int, help="tokens per window (default: the smallest context)")
    ppl.add_argument("--samples", type=positive_int, default=4, help="diffusion times per window (default 4)")
    ppl.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    kinds = (
        ("humaneval", "pass@1 on the 164 HumanEval problems, run in a sandbox", 128),
        ("infill", "single- and multi-line infilling of HumanEval's canonical solutions", 16),
        ("syntax", "share of completions of held-out function headers that parse", 128),
    )
    for name, text, tokens in kinds:
        p = metrics.add_parser(name, help=text, description=text + (
            "; each hole gets a canvas of 1.5x its true length (--max-new-tokens is not used)" if name == "infill" else ""
        ))
        _add_decoding_flags(p, default_tokens=tokens)
        if name != "syntax":
            p.add_argument("--workers", type=positive_int, default=2, help="programs run at once in the sandbox")
            p.add_argument("--timeout", type=_bounded(float, 0.0, 600.0, low_open=True), default=5.0, help="seconds per program")
            p.add_argument("--memory-mb", type=_bounded(int, 64), default=1024, help="address-space limit per program")
        _add_healing_flag(p)
        if name == "humaneval":
            p.add_argument("--raw-prompts", action="store_true",
                           help="give the prompts as shipped, trailing newline included (default: without it)")
        if name == "infill":
            p.add_argument("--tokens-per-step", type=positive_int,
                           help="give each hole ceil(length / K) steps (instead of --steps, which is the same for every hole)")
    for name, p in metrics.choices.items():
        p.add_argument("--limit", type=positive_int, help="evaluate only this many items (windows, problems, headers)")
        p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
        p.add_argument("--json", metavar="PATH", help="also write the full record (every item) as JSON")
        if name in ("ppl", "syntax"):
            p.add_argument("--data", nargs="+", metavar="PATH",
                           help="held-out data: shard directory, .npy tokens or source files (default: the model's validation split)")


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    """`pull`, `list` and `chat`: the model cache and the terminal chat."""
    pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub into the cache")
    pull.add_argument("repo_id", metavar="ORG/NAME", help="Hub model id, e.g. GSAI-ML/LLaDA-8B-Instruct")
    pull.add_argument("--revision", help="branch, tag or commit (default: main)")
    pull.add_argument(
        "--timeout", type=_bounded(float, 0.0, 600.0, low_open=True), default=5.0,
        help="seconds to wait for the Hub before giving up",
    )

    lst = sub.add_parser("list", help="show the embedded model and the cached ones")
    lst.add_argument("--json", action="store_true", help="machine-readable output")

    chat = sub.add_parser("chat", help="talk to a model in the terminal with its chat template")
    chat.add_argument("model_name", nargs="?", metavar="MODEL", help="model directory or cached name (default: --model, else the embedded model)")
    chat.add_argument("--system", help="system message opening the conversation")
    chat.add_argument("--json", action="store_true", help="one JSON object per answer on stdout (for scripts)")
    _add_decoding_flags(chat, default_tokens=128)


def _generation_config(args: argparse.Namespace, loaded):
    """The user's flags, else the model's ``decoding.json``, else one token per step (``decoding.defaults``)."""
    from unmask.decoding import GenerationConfig
    from unmask.decoding.defaults import DecodingChoice, resolve

    user = DecodingChoice(policy=args.policy, threshold=args.threshold, steps=args.steps, block_size=args.block_size,
                  cache=args.cache)
    settings = resolve(user, loaded.decoding, DecodingChoice(), loaded.model.config, args.max_new_tokens)
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, cache_refresh=args.cache_refresh, **settings,
    )


def _run_decoding(args: argparse.Namespace, prompt_text: str, run: Callable, visible_prefix: str) -> None:
    """Load the model, heal ``prompt_text`` (``--token-healing``), run ``run(loaded, config, on_step, healed)``,
    print the completion (what follows the prompt as typed) and the statistics."""
    from rich.console import Console

    from unmask.decoding import completion_text, heal
    from unmask.loading import load
    from unmask.view import LiveCanvas

    loaded = load(args.model, device=args.device)
    config = _generation_config(args, loaded)
    healed = heal(loaded.tokenizer, loaded.tokenizer.encode(prompt_text), args.token_healing)
    if healed.heal is not None:  # the canvas spells the removed text again
        visible_prefix = loaded.tokenizer.decode(healed.ids)
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


def cmd_generate(args: argparse.Namespace) -> None:
    from unmask.decoding import decode

    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            raise UnmaskError("no prompt: pass it as an argument or on stdin")
        prompt = sys.stdin.read()
    if not prompt:
        raise UnmaskError("the prompt is empty")

    def run(loaded, config, on_step, healed):
        return decode(loaded.model, [healed.ids], config, on_step=on_step, heal=[healed.heal])

    _run_decoding(args, prompt, run, visible_prefix=prompt)


def cmd_infill(args: argparse.Namespace) -> None:
    from unmask.decoding import infill

    def run(loaded, config, on_step, healed):
        if loaded.model.config.attention == "causal":
            raise UnmaskError("infill needs a diffusion model; this one is autoregressive")
        suffix = loaded.tokenizer.encode(args.suffix)
        return infill(loaded.model, [healed.ids], [suffix], config, on_step=on_step, heal=[healed.heal])

    _run_decoding(args, args.prefix, run, visible_prefix=args.prefix)


def cmd_train(args: argparse.Namespace) -> None:
    from unmask.train.trainer import run_training

    import os

    if args.nproc_per_node and "WORLD_SIZE" not in os.environ:
        from torch.distributed.run import main as torchrun

        rest = [args.config] + (["--steps", str(args.steps)] if args.steps else []) + (["--fresh"] if args.fresh else [])
        torchrun(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "unmask", "train", *rest])
        return
    overrides = {"train": {"steps": args.steps}} if args.steps else None
    final = run_training(args.config, overrides=overrides, resume=not args.fresh)
    if os.environ.get("RANK", "0") == "0":
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
        "training": _portable(loaded.training),
    }
    if cfg.attention == "block":
        facts["block_size"] = cfg.block_size
    if args.json:
        print(json.dumps(facts, indent=2))
        return
    for key, value in _flat(facts):
        print(f"{key}: {value}")


def _portable(record: Any) -> Any:
    """A training record without the training machine's absolute paths (they name nothing here)."""
    if isinstance(record, dict):
        return {k: _portable(v) for k, v in record.items() if not _absolute_path(v)}
    if isinstance(record, list):
        return [_portable(v) for v in record if not _absolute_path(v)]
    return record


def _absolute_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/")))


def _flat(facts: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested records as ``a.b.c: value`` lines."""
    out: list[tuple[str, Any]] = []
    for key, value in facts.items():
        if isinstance(value, dict) and value:
            out += _flat(value, f"{prefix}{key}.")
        elif not isinstance(value, dict):
            out.append((f"{prefix}{key}", value))
    return out


def cmd_pull(args: argparse.Namespace) -> None:
    from unmask.hub import pull

    print(pull(args.repo_id, revision=args.revision, timeout=args.timeout))


def cmd_list(args: argparse.Namespace) -> None:
    from unmask.hub import entries_json, list_models, print_models

    entries = list_models()
    if args.json:
        print(entries_json(entries))
        return
    print_models(entries)


def cmd_chat(args: argparse.Namespace) -> None:
    from unmask.chat import ChatOptions, run_chat
    from unmask.loading import load

    if args.model_name and args.model and args.model_name != args.model:
        raise UnmaskError(f"two models named: {args.model_name} and --model {args.model}")
    loaded = load(args.model_name or args.model, device=args.device)
    options = ChatOptions(show_steps=args.show_steps, frame_delay=args.frame_delay, quiet=args.quiet, json=args.json)
    failed = run_chat(loaded, _generation_config(args, loaded), args.system, options)
    if failed:
        raise UnmaskError(f"{failed} turn{'s' if failed > 1 else ''} failed")


def _add_data_command(sub: argparse._SubParsersAction) -> None:
    """`data build`: source files -> token shards for `unmask train`; `data sft-pairs`: functions -> SFT pairs."""
    from unmask.train import mine

    data = sub.add_parser("data", help="training data tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    build = data_sub.add_parser("build", help="tokenise source files into memory-mapped token shards")
    build.add_argument("sources", nargs="*", help="files, directories, globs, .jsonl or .parquet files "
                       "(default: this Python's standard library and site-packages)")
    build.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json)")
    build.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    build.add_argument("--workers", type=positive_int, help="tokenising processes (default: the usable CPUs)")
    build.add_argument("--val-fraction", type=_bounded(float, 0.0, 0.99), default=0.02,
                       help="share of files held out for validation, chosen by content hash")
    build.add_argument("--dtype", choices=("auto", "uint16", "uint32"), default="auto",
                       help="token id type in the shards; auto: uint16 when the vocabulary fits")
    build.add_argument("--suffix", action="append", help="file suffix to read in directories (default .py; repeatable)")
    build.add_argument("--text-field", default="text", help="field holding the text in JSONL records and Parquet rows")
    build.add_argument("--max-file-mb", type=_bounded(float, 0.0, low_open=True), default=1.0,
                       help="skip documents larger than this")
    build.add_argument("--shard-mb", type=_bounded(float, 0.0, low_open=True), default=32.0, help="source text per shard")
    build.add_argument("--max-files", type=positive_int, help="keep at most this many files (a uniform sample by hash)")
    mine.add_arguments(data_sub.add_parser("sft-pairs", help="mine SFT pairs (docstring -> function) from Python files"))


def cmd_data(args: argparse.Namespace) -> None:
    import os

    if args.data_command == "sft-pairs":
        from unmask.train import mine

        mine.main(args)
        return

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


def _add_serve_command(sub: argparse._SubParsersAction) -> None:
    """`serve`: the OpenAI-compatible HTTP server and the playground."""
    serve = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API with a playground")
    serve.add_argument("model_name", nargs="?", metavar="MODEL", help="model directory or cached name (default: --model, else the embedded model)")
    serve.add_argument("--model", help="model directory or cached name (same as MODEL)")
    serve.add_argument("--ar-model", help="also serve this autoregressive model (for side-by-side races)")
    serve.add_argument("--served-model-name", help="the first model's name in the API (default: its directory name)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=_bounded(int, 0, 65535), default=8000, help="TCP port to listen on")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $UNMASK_API_KEY)")
    serve.add_argument("--max-concurrency", type=positive_int, default=8, help="requests per model decoded in one batch")
    serve.add_argument("--max-queue", type=_bounded(int, 0), default=64, help="requests per model waiting for a slot; more get 429")
    serve.add_argument("--max-model-len", type=positive_int, help="cap on prompt + answer tokens (default: the model's context)")
    serve.add_argument("--cache", choices=("none", "prefix", "dual"),
                       help="block KV cache of the running batch (approximate for bidirectional models, exact for block-causal)")
    serve.add_argument("--cache-refresh", type=positive_int, help="with --cache: recompute every canvas every N steps")
    serve.add_argument("--max-n", type=positive_int, default=8, help="most choices (n x prompts) per request")
    serve.add_argument("--shutdown-timeout", type=_bounded(float, 0.0, 3600.0), default=10.0,
                       help="seconds in-flight requests get to finish on SIGTERM")
    serve.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level")
    serve.add_argument("--allow-host", action="append", metavar="NAME",
                       help="also answer this Host header name (repeatable; '*' = any; default: the bound names)")


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from unmask.serve import LaunchOptions, ServeSettings, run_server

    if args.model_name and args.model and args.model_name != args.model:
        raise UnmaskError(f"two models named: {args.model_name} and --model {args.model}")
    settings = ServeSettings(
        api_key=args.api_key or os.environ.get("UNMASK_API_KEY") or None,
        max_model_len=args.max_model_len,
        max_choices=args.max_n,
        shutdown_timeout=args.shutdown_timeout,
        allowed_hosts=(*ServeSettings().allowed_hosts, *(args.allow_host or ())),
    )
    options = LaunchOptions(
        model=args.model_name or args.model, ar_model=args.ar_model, served_model_name=args.served_model_name,
        host=args.host, port=args.port, device=args.device, max_concurrency=args.max_concurrency,
        max_queue=args.max_queue, cache=args.cache, cache_refresh=args.cache_refresh, log_level=args.log_level,
    )
    run_server(options, settings)


def cmd_bench(args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from unmask import bench
    from unmask.loading import load, resolve_device

    device = resolve_device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    max_len = args.prompt_len + args.gen
    if args.shapes:
        model = bench.random_model(args.shapes, device, dtype, max_len)
        name = f"{args.shapes} (random weights)"
        vocab = model.config.vocab_size
        prompts = [[2 + (7919 * (r + 1) * (i + 1)) % (vocab - 4) for i in range(args.prompt_len)] for r in range(args.batch)]
    else:
        loaded = load(args.model, device=args.device, dtype=dtype)
        model, name = loaded.model, str(loaded.path)
        text = Path(bench.__file__).read_text()
        ids = loaded.tokenizer.encode(text)[: args.prompt_len]
        prompts = [ids[r:] + ids[:r] for r in range(args.batch)]
    if max_len > model.config.max_seq_len:
        raise UnmaskError(f"--prompt-len + --gen = {max_len} exceeds the model's context of {model.config.max_seq_len}")
    ar = bench.as_autoregressive(model) if model.config.attention != "causal" else model
    if args.ar_model:
        ar = load(args.ar_model, device=args.device, dtype=dtype).model
        if ar.config.attention != "causal":
            raise UnmaskError(f"--ar-model {args.ar_model} is not autoregressive (attention {ar.config.attention})")
    if args.agreement:
        _bench_agreement(args, model, None if args.shapes else loaded.tokenizer, prompts, name)
        return
    settings = [s for s in bench.default_settings(args.gen, args.block, args.tpf, args.thresholds) if args.only in ("all", s.kind)]
    console = Console(stderr=True)
    table = Table(title=f"unmask bench · {name}", title_justify="left")
    for column in ("setting", "NFE", "tok/fwd", "ms/fwd", "tok/s", "x floor"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    with console.status("timing...") if console.is_terminal else _nullcontext():
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
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def cmd_eval(args: argparse.Namespace) -> None:
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
        config = _generation_config(args, loaded)
        common = {"limit": args.limit, "batch_size": args.batch_size, "token_healing": args.token_healing}
        if args.eval_command == "syntax":
            report = syntax.evaluate(loaded, config, data=args.data, seed=args.seed, **common)
        else:
            limits = Limits(timeout=args.timeout, memory_mb=args.memory_mb)
            module = humaneval if args.eval_command == "humaneval" else infill
            extra = {"seed": args.seed, "tokens_per_step": args.tokens_per_step} if module is infill else {}
            if module is humaneval:
                extra = {"raw_prompts": args.raw_prompts}
            report = module.evaluate(loaded, config, workers=args.workers, limits=limits, **common, **extra)
    show(report)
    if args.json:
        write_json(report, args.json)


def _bench_agreement(args: argparse.Namespace, model, tokenizer, prompts, name: str) -> None:
    """Prompts cut from unmask's own sources (never training data), decoded with and without caches."""
    from rich.console import Console
    from rich.table import Table

    from unmask import bench

    if tokenizer is not None:
        sources = sorted(Path(bench.__file__).parent.rglob("*.py"))
        ids = [t for path in sources for t in tokenizer.encode(path.read_text())]
        stride = max((len(ids) - args.prompt_len) // args.agreement, 1)
        prompts = [ids[i * stride : i * stride + args.prompt_len] for i in range(args.agreement)]
    rows = bench.cache_agreement(model, prompts[: args.agreement], args.gen, args.block, args.tpf, args.cache_refresh)
    table = Table(title=f"block-cache agreement with uncached greedy decoding · {name}", title_justify="left")
    for column in ("tokens/step", "cache", "token agreement", "identical outputs"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["tokens_per_step"]), row["cache"], f"{row['token_agreement']:.1%}", f"{row['exact']:.1%}")
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    if args.json:
        report = {"model": name, "prompts": len(prompts[: args.agreement]), "prompt_len": args.prompt_len,
                  "gen_len": args.gen, "block": args.block, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _nullcontext():
    from contextlib import nullcontext

    return nullcontext()


def cmd_export(args: argparse.Namespace) -> None:
    from unmask.models.gguf.write import export_model

    print("\n".join(export_model(args.model_name, args.gguf, args.dtype)))


COMMANDS = {
    "export": cmd_export,
    "generate": cmd_generate,
    "infill": cmd_infill,
    "train": cmd_train,
    "tokenizer": cmd_tokenizer,
    "info": cmd_info,
    "pull": cmd_pull,
    "list": cmd_list,
    "chat": cmd_chat,
    "serve": cmd_serve,
    "data": cmd_data,
    "bench": cmd_bench,
    "eval": cmd_eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command not in TORCH_FREE:
            from unmask import threads

            threads.configure()
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
