"""Flag groups that several commands share, each defined once: model, device, decoding, view, healing.

The decoding flags are made from the declaration in ``unmask.decoding.settings`` (type, bounds,
help, default), the same one the server's request fields come from, so ``--top-p 0`` and
``"top_p": 0`` are refused alike. That import needs torch, so these flags are built only for the
command being run (see ``unmask.cli.Parser``); the rest of this module imports nothing heavy.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unmask.bounds import Bounds
from unmask.errors import UnmaskError

if TYPE_CHECKING:
    from unmask.decoding import GenerationConfig
    from unmask.loading import LoadedModel

MODEL_HELP = "model directory, GGUF file or name: default, default-ar, smollm2-135m, coder-nano-cpu, a cached ORG/NAME"
COMMAND_LINE_DEFAULTS = {"seed": 0}  # where the command line departs from GenerationConfig: a run repeats exactly


def parsed(kind: type, check: Callable[[Any], str | None]) -> Callable[[str], Any]:
    """An argparse type: the text as ``kind``, refused with ``check``'s reason when it gives one."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    return parse


def bounded(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type that parses ``kind`` and checks it lies in the given range."""
    return parsed(kind, Bounds(low, high, low_open).problem)


positive_int = bounded(int, 1)


def add_model(p: argparse.ArgumentParser | argparse._ActionsContainer, *, positional: bool = False) -> None:
    """``--model``; with ``positional``, also an optional MODEL argument that means the same."""
    if positional:
        p.add_argument("model_name", nargs="?", metavar="MODEL", help=f"{MODEL_HELP} (default: --model, else the embedded model)")
        p.add_argument("--model", help="the same as MODEL")
    else:
        p.add_argument("--model", help=f"{MODEL_HELP} (default: the embedded model)")


def chosen_model(args: argparse.Namespace) -> str | None:
    """The model named by MODEL or ``--model`` (None: the embedded one); naming two is a mistake."""
    positional, flag = getattr(args, "model_name", None), args.model
    if positional and flag and positional != flag:
        raise UnmaskError(f"two models named: {positional} and --model {flag}")
    return positional or flag


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")


def add_setting(p: argparse.ArgumentParser, name: str, help: str | None = None, default: Any = None) -> None:
    """The declared decoding setting ``name`` as a flag. A setting ``resolve`` decides (policy, steps,
    block_size, cache, ...) is None unless given, so the model's ``decoding.json`` can still say; the
    others default to ``default``, else the command line's own, else ``GenerationConfig``'s."""
    from unmask.decoding.defaults import CHOSEN, DEFAULT_BLOCK
    from unmask.decoding.settings import SETTING

    s = SETTING[name]
    text = help or s.help
    kwargs: dict[str, Any] = {}
    if s.choices:
        kwargs.update(choices=s.choices, metavar=name.upper())
        text += f", one of {', '.join(s.choices)}"
    else:
        kwargs["type"] = parsed(s.kind, s.problem)
    if s.policy is not None:
        text += f"; alone, it selects --policy {s.policy}"
    if name in CHOSEN:
        own = "a block-causal model's own block, else " if name == "block_size" else ""
        last = DEFAULT_BLOCK if name == "block_size" else s.unset if s.default is None else s.default
        p.add_argument(s.flag, help=f"{text} (default: {own}the model's decoding.json, else {last})", **kwargs)
        return
    value = default if default is not None else COMMAND_LINE_DEFAULTS.get(name, s.default)
    p.add_argument(s.flag, default=value, help=text if value is not None else f"{text} (default: {s.unset})", **kwargs)


def add_decoding(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """Every declared decoding setting as a flag, the canvas ``max_new_tokens`` long by default."""
    from unmask.decoding.settings import SETTINGS

    for s in SETTINGS:
        add_setting(p, s.name, default=max_new_tokens if s.name == "max_new_tokens" else None)


def generation_config(args: argparse.Namespace, loaded: "LoadedModel") -> "GenerationConfig":
    """The user's flags, else the model's ``decoding.json``, else ``GenerationConfig``'s defaults."""
    from unmask.decoding import GenerationConfig
    from unmask.decoding.defaults import DecodingChoice, choose, resolve
    from unmask.decoding.settings import SETTING

    user, given = choose({name: value for name, value in vars(args).items() if name in SETTING})
    chosen = resolve(user, loaded.decoding, DecodingChoice(), loaded.model.config, args.max_new_tokens)
    return GenerationConfig(**given, **chosen)


def add_view(p: argparse.ArgumentParser) -> None:
    """How a decoding shows itself on stderr."""
    p.add_argument("--show-steps", action="store_true", help="animate the denoising on the terminal (stderr)")
    p.add_argument("--frame-delay", type=bounded(float, 0.0, 10.0), default=0.04,
                   help="with --show-steps: seconds each frame stays on screen (not counted in tokens/s)")
    p.add_argument("--quiet", action="store_true", help="no statistics on stderr")


def add_healing(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token-healing", action=argparse.BooleanOptionalAction, default=True,
        help="back the prompt up to a token boundary the tokenizer keeps and make the output start with the "
        "removed text (default: on)",
    )
