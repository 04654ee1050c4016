"""Chat templates (Hugging Face-style Jinja) in a sandbox, with bounds, and a worker process to run them in.

A chat template comes from a model directory, so it is untrusted code. It runs in Jinja's
``ImmutableSandboxedEnvironment`` (no Python internals, no mutation of the messages), and on
top of that:

- ``*`` and ``**`` are checked before they run, so ``{{ 'x' * 10**8 }}`` fails at once instead
  of allocating; the rendered text is produced piece by piece and cut off past ``max_chars``;
- every failure, limits included, is an ``UnmaskError``.

What a sandbox inside the process cannot bound is time (nested loops) and memory grown by
other means, so the server renders in a separate process (``python -m unmask.chat_template``,
one JSON request per line of the protocol below) that it kills past a deadline; the worker
also caps its own address space. Protocol: a 4-byte big-endian length, then that many bytes of
JSON, each way; request ``{"template", "messages", "add_generation_prompt", "names",
"max_chars"}``, reply ``{"text"}`` or ``{"error"}``.
"""

from __future__ import annotations

import json
import operator
import struct
import sys
from functools import lru_cache
from typing import Any, BinaryIO

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from unmask.errors import UnmaskError

MAX_CHARS = 1 << 20  # longest rendered chat (characters) unless a caller says otherwise
MAX_POWER_BITS = 4096  # largest result of ``**`` in a template, in bits
WORKER_MEMORY = 1 << 30  # address space of a render worker (bytes)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with ``*`` and ``**`` refused when their result would be huge."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) and len(seq) * count > MAX_CHARS:
                    raise SecurityError(f"'*' would build a sequence of {len(seq) * count} items")
            return operator.mul(left, right)
        if operator_ == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                if abs(left) > 1 and right * max(abs(left).bit_length(), 1) > MAX_POWER_BITS:
                    raise SecurityError("'**' would build a number too large")
            return operator.pow(left, right)
        return super().call_binop(context, operator_, left, right)


def _tojson(value: Any, indent: int | None = None) -> str:
    """JSON without HTML escaping (what chat templates expect from `tojson`)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    """Exposed to templates (HF convention) to reject a conversation."""
    raise UnmaskError(f"chat template rejected the messages: {message}")


@lru_cache(maxsize=1)
def environment() -> BoundedEnvironment:
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env


@lru_cache(maxsize=16)
def compile_template(source: str) -> Template:
    try:
        return environment().from_string(source)
    except TemplateError as e:
        raise UnmaskError(f"chat template does not parse: {e}") from None


def render(template: Template | str, messages: list[dict], add_generation_prompt: bool,
           names: dict[str, str | None], max_chars: int = MAX_CHARS) -> str:
    """The rendered chat; an error (the template's own, or a bound) is an ``UnmaskError``."""
    if isinstance(template, str):
        template = compile_template(template)
    pieces, size = [], 0
    try:
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **names):
            size += len(piece)
            if size > max_chars:
                raise UnmaskError(f"chat template output is longer than {max_chars} characters")
            pieces.append(piece)
    except UnmaskError:
        raise
    except MemoryError:
        raise UnmaskError("chat template ran out of memory") from None
    except Exception as e:  # SecurityError, UndefinedError, TypeError ... from template code
        raise UnmaskError(f"chat template failed: {type(e).__name__}: {str(e)[:300]}") from None
    return "".join(pieces)


def render_kwargs(names: dict[str, str | None]) -> dict[str, str | None]:
    """The special-token variables a template sees, from the tokenizer's named tokens."""
    return {"eos_token": names.get("eos"), "bos_token": names.get("bos") or "", "pad_token": names.get("pad"),
            "mask_token": names.get("mask")}


# ---------------------------------------------------------------------------- the worker process


def write_message(stream: BinaryIO, message: dict[str, Any]) -> None:
    data = json.dumps(message, ensure_ascii=False).encode("utf-8")
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def read_message(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    return json.loads(stream.read(size).decode("utf-8"))


def serve_requests(inp: BinaryIO, out: BinaryIO) -> None:
    """Answer render requests until the input closes."""
    while (request := read_message(inp)) is not None:
        try:
            text = render(request["template"], request["messages"], bool(request["add_generation_prompt"]),
                          request["names"], int(request["max_chars"]))
            reply: dict[str, Any] = {"text": text}
        except UnmaskError as e:
            reply = {"error": str(e)}
        except Exception as e:  # a malformed request: say so rather than die
            reply = {"error": f"render worker: {type(e).__name__}: {e}"}
        write_message(out, reply)


def main() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    serve_requests(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
