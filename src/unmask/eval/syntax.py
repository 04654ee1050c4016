"""Syntax validity: the share of completions of held-out function headers that parse.

Headers are the ``def`` lines (through the line with the colon) of every function and method in
the held-out files (``unmask.eval.heldout``) whose body starts on a later line, dedented to
column 0. The model is given the header alone, without its final newline (the project's
tokenizers join a newline with the next line's indentation), and writes the body. The
completion is cut where the function ends: at the first non-blank line back at column 0. When
the model was stopped by the token budget rather than ending the function itself, its last,
possibly unfinished line is dropped. ``ast.parse(header + completion)`` decides.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from unmask.decoding import GenerationConfig
from unmask.eval.generation import complete
from unmask.eval.heldout import heldout_documents
from unmask.errors import UnmaskError
from unmask.eval.report import Report, environment, model_facts, progress_bar
from unmask.loading import LoadedModel


@dataclass
class Header:
    """A function header from a held-out file."""

    source: str  # file it came from
    line: int  # 1-based line of the ``def``
    text: str  # dedented header lines, without the final newline


def extract_headers(text: str, source: str = "<text>") -> list[Header]:
    """Headers of the functions and methods in ``text`` (none if it does not parse)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    headers = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.body[0].lineno <= node.lineno:
            continue
        chunk = lines[node.lineno - 1 : node.body[0].lineno - 1]
        while chunk and (not chunk[-1].strip() or chunk[-1].lstrip().startswith("#")):
            chunk.pop()
        header = textwrap.dedent("\n".join(chunk))
        if header and _parses(header + "\n    pass\n"):
            headers.append(Header(source, node.lineno, header))
    headers.sort(key=lambda h: h.line)
    return headers


def cut_at_function_end(header: str, completion: str, ran_out: bool) -> tuple[str, bool]:
    """The completion up to the end of the function (a non-blank line at column 0), and whether it got there.

    ``ran_out``: decoding stopped at the token budget, so a completion that never ends the
    function loses its last, possibly unfinished, line.
    """
    lines = (header + completion).split("\n")
    first_body = header.count("\n") + 1
    for i in range(first_body, len(lines)):
        if lines[i].strip() and not lines[i][0].isspace():
            return "\n".join(lines[:i])[len(header) :], True
    end = len(lines) - 1 if ran_out and len(lines) > first_body else len(lines)
    return "\n".join(lines[:end])[len(header) :], False


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def parses(header: str, completion: str) -> bool:
    """Whether the header followed by the (cut) completion is valid Python."""
    return _parses(header + completion + "\n")


def sample_headers(documents: Sequence[tuple[str, str]], limit: int | None, seed: int) -> list[Header]:
    """All headers of the documents, or a seeded sample of ``limit`` of them in file order."""
    headers = [h for name, text in documents for h in extract_headers(text, name)]
    if limit is not None and limit < len(headers):
        keep = sorted(random.Random(seed).sample(range(len(headers)), limit))
        headers = [headers[i] for i in keep]
    return headers


def evaluate(
    loaded: LoadedModel,
    config: GenerationConfig,
    *,
    data: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    token_healing: bool = True,
) -> Report:
    """Share of parsing completions over the held-out headers."""
    held = heldout_documents(loaded.training, data)
    headers = sample_headers(held.documents, limit, seed)
    if not headers:
        raise UnmaskError(f"no function headers found in {held.source}")
    with progress_bar("completing", len(headers)) as advance:
        outputs = complete(loaded, [h.text for h in headers], config, batch_size, advance, token_healing)
    cuts = [
        cut_at_function_end(h.text, text, why == "length")
        for h, text, why in zip(headers, outputs.texts, outputs.finish_reasons)
    ]
    ok = [parses(h.text, c) for h, (c, _) in zip(headers, cuts)]
    ended = sum(e for _, e in cuts)
    n, valid = len(headers), sum(ok)
    stats = outputs.stats()
    rows = [[loaded.path.name, stats["mode"], n, valid, valid / n, ended, stats["tokens_per_forward"], stats["tokens_per_second"]]]
    notes = [f"headers: {held.source}.", f"{ended} of {n} completions ended the function (a line back at column 0) within the budget."]
    if outputs.truncated:
        notes.append(f"{outputs.truncated} headers were longer than the context allows and lost their beginning.")
    data_out = {
        "metric": "syntax-valid completions",
        "model": model_facts(loaded),
        "generation": dataclasses.asdict(config),
        "token_healing": token_healing,
        "headers_source": held.source,
        "headers": n,
        "valid": valid,
        "valid_rate": valid / n,
        "ended_function": ended,
        "decoding": stats,
        "environment": environment(loaded),
        "results": [
            {"source": h.source, "line": h.line, "header": h.text, "completion": c, "parses": v}
            for h, (c, _), v in zip(headers, cuts, ok)
        ],
    }
    columns = ["model", "decoding", "headers", "parse", "share", "ended fn", "tokens/forward", "tokens/s"]
    return Report("Syntax-valid completions", columns, rows, notes, data_out)
