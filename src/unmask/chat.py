"""A multi-turn chat in the terminal, rendered with the model's own chat template.

Each turn renders (system +) history + the new user message with the tokenizer's sandboxed
chat template and decodes an answer that ends at the tokenizer's stop tokens (EOS,
end-of-turn). When that prompt plus the answer's canvas would not fit the model's context, the
oldest exchanges are left out, and the user is told so.

On a terminal: line editing, ``/reset``, ``/exit``, Ctrl-D quits, Ctrl-C stops an answer.
With stdin piped, every line is one user turn, so a conversation can be scripted (``--json``
prints one object per turn).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console

from unmask.decoding import GenerationConfig, GenerationResult, StepEvent, decode
from unmask.errors import UnmaskError
from unmask.loading import LoadedModel
from unmask.tokenizer import Tokenizer

PROMPT = ">>> "
_COMMAND = re.compile(r"/[a-z]+")
COMMANDS_HELP = "/reset clears the history, /exit or Ctrl-D quits"


class Conversation:
    """The messages so far, and the rule that keeps a prompt inside the model's context."""

    def __init__(self, tokenizer: Tokenizer, budget: int, system: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.budget = budget  # most prompt tokens a turn may use (context - answer canvas)
        self.system = system
        self.history: list[dict[str, str]] = []  # user and assistant messages, alternating

    def messages(self, user: str, skip: int = 0) -> list[dict[str, str]]:
        """System message, history without its ``skip`` oldest exchanges, then ``user``'s message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history[2 * skip :] + [{"role": "user", "content": user}]

    def prompt(self, user: str) -> tuple[list[int], int]:
        """Prompt ids for ``user``'s message and how many of the oldest exchanges it leaves out."""
        for skip in range(len(self.history) // 2 + 1):
            ids = self.tokenizer.encode_chat(self.messages(user, skip))
            if len(ids) <= self.budget:
                return ids, skip
        raise UnmaskError(
            f"this message makes a prompt of {len(ids)} tokens, but the context leaves room for {self.budget} "
            "(shorten it or lower --max-new-tokens)"
        )

    def add(self, user: str, answer: str, skipped: int) -> None:
        """Record an exchange; exchanges left out of its prompt are gone for good."""
        self.history = self.history[2 * skipped :] + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]

    def reset(self) -> None:
        self.history = []


@dataclass
class Reply:
    """One answered turn."""

    text: str  # the answer, stop tokens removed
    prompt_tokens: int  # length of the rendered prompt
    dropped: int  # oldest exchanges left out to fit the context
    result: GenerationResult  # ids, NFE, timing
    view_seconds: float  # time spent drawing live frames (not decoding)


@dataclass
class ChatOptions:
    """How the loop talks to the terminal."""

    show_steps: bool = False  # animate each answer's denoising on stderr
    frame_delay: float = 0.04  # seconds each frame stays on screen
    quiet: bool = False  # no statistics on stderr
    json: bool = False  # one JSON object per turn on stdout instead of the bare answer


def chat_config(config: GenerationConfig, tokenizer: Tokenizer) -> GenerationConfig:
    """``config`` with the tokenizer's stop tokens (EOS, end-of-turn) ending an answer."""
    config.stop_ids = tuple(sorted(set(config.stop_ids) | tokenizer.stop_ids))
    config.validate()
    return config


def respond(
    loaded: LoadedModel,
    conversation: Conversation,
    user: str,
    config: GenerationConfig,
    console: Console | None = None,
    options: ChatOptions | None = None,
) -> Reply:
    """Decode the answer to ``user``'s message (the history is not changed; see ``Conversation.add``)."""
    ids, dropped = conversation.prompt(user)
    options = options or ChatOptions()
    mask_id = loaded.model.config.mask_token_id
    view_seconds = 0.0
    if options.show_steps and mask_id is not None and console is not None:
        from unmask.view import LiveCanvas

        with LiveCanvas(loaded.tokenizer, mask_id, console=console) as live:

            def on_step(event: StepEvent) -> None:
                nonlocal view_seconds
                began = time.perf_counter()
                live.frame(event.canvas[0].tolist(), event.committed[0].tolist(),
                           f"step {event.step + 1} · {event.nfe} forward passes")
                time.sleep(options.frame_delay)
                view_seconds += time.perf_counter() - began

            result = decode(loaded.model, [ids], config, on_step=on_step)
    else:
        result = decode(loaded.model, [ids], config)
    text = loaded.tokenizer.decode(result.sequences[0]).strip()
    return Reply(text, len(ids), dropped, result, view_seconds)


def run_chat(
    loaded: LoadedModel,
    config: GenerationConfig,
    system: str | None = None,
    options: ChatOptions | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """The chat loop; returns how many turns failed (their errors are printed, the loop goes on)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    options = options or ChatOptions()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    context = loaded.model.config.max_seq_len
    budget = context - config.max_new_tokens
    if budget < 1:
        raise UnmaskError(
            f"--max-new-tokens {config.max_new_tokens} leaves no room for a prompt in the model's context of {context} tokens"
        )
    config = chat_config(config, loaded.tokenizer)
    conversation = Conversation(loaded.tokenizer, budget, system)
    interactive = stdin.isatty()
    if interactive:
        err.print(f"[dim]unmask chat · {loaded.path} · context {context} tokens · {COMMANDS_HELP}[/dim]")
    failed = answered = 0
    for line in _lines(stdin, interactive, err):
        text = line.strip()
        if not text:
            continue
        if _COMMAND.fullmatch(text):
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                conversation.reset()
                err.print("[dim]history cleared[/dim]")
            else:
                err.print(f"unknown command {text} ({COMMANDS_HELP})", markup=False)
            continue
        try:
            reply = respond(loaded, conversation, text, config, err, options)
        except UnmaskError as exc:
            err.print(f"unmask: error: {exc}", markup=False)
            failed += 1
            continue
        except KeyboardInterrupt:
            if not interactive:
                raise
            err.print("[dim](answer stopped)[/dim]")
            continue
        conversation.add(text, reply.text, reply.dropped)
        answered += 1
        if reply.dropped:
            err.print(
                f"[dim](left out the {reply.dropped} oldest exchange{'s' if reply.dropped > 1 else ''} "
                f"to fit the model's context of {context} tokens)[/dim]"
            )
        _show(reply, answered, stdout, err, options)
    return failed


def _lines(stdin: TextIO, interactive: bool, err: Console) -> Iterator[str]:
    """User lines until EOF; on a terminal with line editing, Ctrl-C giving a fresh prompt."""
    if not interactive:
        yield from stdin
        return
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            yield input(PROMPT)
        except EOFError:
            sys.stdout.write("\n")
            return
        except KeyboardInterrupt:
            err.print(f"\n[dim]{COMMANDS_HELP}[/dim]")


def _show(reply: Reply, turn: int, stdout: TextIO, err: Console, options: ChatOptions) -> None:
    result = reply.result
    if options.json:
        record = {
            "turn": turn,
            "answer": reply.text,
            "prompt_tokens": reply.prompt_tokens,
            "dropped_exchanges": reply.dropped,
            "completion_tokens": len(result.sequences[0]),
            "finish_reason": result.finish_reasons[0],
            "nfe": result.nfe,
        }
        stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        stdout.write(reply.text + "\n")
    stdout.flush()
    if not options.quiet:
        tokens = len(result.sequences[0])
        compute = result.elapsed - reply.view_seconds
        rate = tokens / compute if compute > 0 else float("inf")
        err.print(
            f"[dim]prompt {reply.prompt_tokens} tokens · {tokens} tokens · NFE {result.nfe} · "
            f"{result.tokens_per_forward:.2f} tokens/forward · {rate:.1f} tokens/s · "
            f"finish: {result.finish_reasons[0]}[/dim]"
        )
