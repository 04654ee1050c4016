"""Sequence-level distillation data: an AR teacher's own greedy answers to SFT prompts.

``unmask data distill PAIRS.jsonl --teacher smollm2-135m --out OUT.jsonl`` keeps the prompts of
a prompt/completion JSONL (``unmask data sft-pairs``) and replaces every answer with the one the
teacher writes greedily. Trained on such data, a parallel (non-autoregressive) student learns a
target that is a deterministic function of the prompt rather than the many ways people wrote
the code, which is what lets it commit several tokens in one step where it would hedge on real
data (sequence-level knowledge distillation, the standard recipe for non-autoregressive
translation).

- **The answer is the function body**: the teacher's text up to the first non-blank line that is
  not indented (a new top-level statement ends the function), or up to its EOS. A prompt whose
  answer has not ended within ``max_new_tokens`` is dropped and counted (``no_end``), so no answer
  is cut mid-function; so is an empty one.
- **Which prompts**: the input's prompt/completion records, ordered by their SHA-256 (a uniform
  sample that does not depend on the file's order), the first ``limit`` of them.
  ``max_prompt_tokens`` drops longer prompts (``long_prompt``), which would not fit a training
  window anyway.
- **Held-out text**: ``exclude`` names files, directories or token-shard builds whose text no
  prompt may come from; a build stands for its validation files, read as the evaluations read
  them (``unmask.eval.heldout``). A prompt all of whose lines (stripped) occur in that text is
  dropped (``held_out``).
- **Resumable**: answers are written in batches; after each batch the output is flushed and
  ``OUT.progress.json`` records how many prompts are done and the output's size. Running the same
  command again truncates the output to that size and goes on; a finished run is a no-op. Other
  settings for the same output are refused.
- Decoding is the fast AR path (``FastARDecoder``), greedy, with token healing (a prompt ends in a
  lone newline, which the tokenizer would have merged with the next line's indentation), the
  teacher's mask token never emitted; a batch's answers equal the reference decoder's one-at-a-time
  ones (``tests/test_distill.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError

PROGRESS_FORMAT = "unmask-distill-1"


def function_body(text: str) -> tuple[str, bool]:
    """(body, ended): ``text`` up to its first non-blank, non-indented line, trailing blank lines dropped."""
    kept, ended = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            ended = True
            break
        kept.append(line)
    body = "".join(kept).rstrip()
    return (body + "\n" if body else ""), ended


def held_out_lines(sources: Iterable[str | Path]) -> frozenset[str]:
    """Every stripped, non-blank line of the held-out documents of ``sources``: each a file, a
    directory, or an ``unmask data build`` output (its validation files, as the evaluations read them)."""
    from unmask.eval.heldout import heldout_documents  # numpy: not for `unmask data --help`

    lines: set[str] = set()
    for source in sources:
        for _, text in heldout_documents({}, [str(source)]).documents:
            lines.update(s for s in (line.strip() for line in text.splitlines()) if s)
    return frozenset(lines)


@dataclass
class DistillResult:
    """What a run (with the runs it resumed) did."""

    out: Path
    done: int = 0  # selected prompts answered or dropped, over all runs
    counts: Counter = field(default_factory=Counter)  # written, no_end, empty, long_prompt; held_out, duplicate_prompt, chat_record

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("prompts done", f"{self.done:,}")] + [(k, f"{v:,}") for k, v in sorted(self.counts.items())]


def select_prompts(pairs: str | Path, limit: int | None, held_out: frozenset[str] = frozenset()
                   ) -> tuple[list[str], Counter]:
    """The prompts to answer, in SHA-256 order, and how many were left out and why."""
    from unmask.train.sft import read_records, record_hash  # numpy and torch: not for `unmask data --help`

    counts: Counter = Counter()
    keyed = []
    for _, record in read_records(pairs):
        if "prompt" not in record:
            counts["chat_record"] += 1
            continue
        lines = {s for s in (line.strip() for line in record["prompt"].splitlines()) if s}
        if held_out and lines and lines <= held_out:
            counts["held_out"] += 1
            continue
        keyed.append((record_hash(record), record["prompt"]))
    keyed.sort()
    unique = list(dict.fromkeys(prompt for _, prompt in keyed))
    counts["duplicate_prompt"] += len(keyed) - len(unique)
    return unique[:limit], counts


def _key(pairs: Path, teacher: str, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    with pairs.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps({"teacher": teacher, **settings}, sort_keys=True).encode())
    return h.hexdigest()


def _write_progress(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def distill(
    pairs: str | Path,
    teacher: str,
    out: str | Path,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    limit: int | None = None,
    max_prompt_tokens: int | None = None,
    exclude: Iterable[str | Path] = (),
    load: Callable[[str], Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> DistillResult:
    """Answer the selected prompts of ``pairs`` with ``teacher``'s greedy bodies into ``out`` (JSONL)."""
    from unmask.decoding.config import GenerationConfig
    from unmask.decoding.fast import FastARDecoder
    from unmask.decoding.healing import completion_text, heal_batch
    from unmask.models.config import AttentionMode

    pairs, out = Path(pairs), Path(out)
    if min(max_new_tokens, batch_size, *(n for n in (limit, max_prompt_tokens) if n is not None)) < 1:
        raise UnmaskError("max_new_tokens, batch_size, limit and max_prompt_tokens must be at least 1")
    exclude = sorted(str(p) for p in exclude)
    settings = {"max_new_tokens": max_new_tokens, "limit": limit, "exclude": exclude, "batch_size": batch_size,
                "max_prompt_tokens": max_prompt_tokens}
    if not pairs.is_file():
        raise UnmaskError(f"{pairs}: SFT pairs file not found")
    key = _key(pairs, teacher, settings)
    progress = out.with_name(out.name + ".progress.json")
    state = {"format": PROGRESS_FORMAT, "key": key, "done": 0, "bytes": 0, "counts": {}}
    if progress.exists():
        try:
            state = json.loads(progress.read_text())
        except ValueError:
            raise UnmaskError(f"{progress}: unreadable progress file; remove it and {out} to start over") from None
        if state.get("format") != PROGRESS_FORMAT or state.get("key") != key:
            raise UnmaskError(f"{out} was written from other pairs or settings; remove it and {progress}, or pick another --out")
    elif out.exists():
        raise UnmaskError(f"{out} exists and is not a resumable distillation output; pick another --out")

    prompts, counts = select_prompts(pairs, limit, held_out_lines(exclude))
    result = DistillResult(out, state["done"], Counter(state["counts"]) or counts)
    if result.done >= len(prompts):
        return result
    loaded = (load or _load_teacher)(teacher)
    model, tokenizer = loaded.model, loaded.tokenizer
    if model.config.attention != AttentionMode.CAUSAL:
        raise UnmaskError(f"{teacher}: the teacher must be an AR (causal) model")
    decoder = FastARDecoder(model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("ab") as f:
        f.truncate(state["bytes"])
        f.seek(state["bytes"])
        index = result.done
        while index < len(prompts):
            batch, encoded = [], []
            while index < len(prompts) and len(batch) < batch_size:
                ids = tokenizer.encode(prompts[index])
                if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                    result.counts["long_prompt"] += 1
                else:
                    batch.append(prompts[index])
                    encoded.append(ids)
                index += 1
            if batch:
                kept, heals = heal_batch(tokenizer, encoded)
                generated = decoder.generate(kept, config, heal=heals)
                answers = zip(generated.sequences, generated.finish_reasons, heals or [None] * len(batch))
                for prompt, (ids, reason, healing) in zip(batch, answers):
                    body, ended = function_body(completion_text(tokenizer, ids, healing))
                    if not body:
                        result.counts["empty"] += 1
                    elif not (ended or reason == "stop"):
                        result.counts["no_end"] += 1
                    else:
                        f.write((json.dumps({"prompt": prompt, "completion": body}, ensure_ascii=False) + "\n").encode())
                        result.counts["written"] += 1
            f.flush()
            os.fsync(f.fileno())
            result.done = index
            _write_progress(progress, {"format": PROGRESS_FORMAT, "key": key, "done": result.done, "bytes": f.tell(),
                                       "counts": dict(result.counts), "total": len(prompts)})
            if on_batch is not None:
                on_batch(result.done, len(prompts))
    return result


def _load_teacher(name: str) -> Any:
    from unmask.loading import load

    return load(name)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``unmask data distill``."""
    p.add_argument("pairs", help="prompt/completion JSONL (unmask data sft-pairs); only the prompts are read")
    p.add_argument("--teacher", required=True, help="the AR model whose greedy answers become the completions")
    p.add_argument("--out", required=True, help="the JSONL file to write (resumed when run again)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer; prompts not answered within it are dropped")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument("--limit", type=int, help="answer at most this many prompts (a uniform sample by hash)")
    p.add_argument("--max-prompt-tokens", type=int, help="drop longer prompts (counted as long_prompt)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="a file or directory no prompt may come from (repeatable)")
    p.add_argument("--exclude-split", metavar="SHARDS",
                   help="exclude every source file of the validation split of this `unmask data build` output")


def main(args: argparse.Namespace) -> DistillResult:
    """Run ``unmask data distill`` and print its summary."""
    exclude = list(args.exclude) + ([args.exclude_split] if args.exclude_split else [])

    def report(done: int, total: int) -> None:
        print(f"\r{done:,}/{total:,} prompts", end="" if sys.stderr.isatty() else "\n", file=sys.stderr, flush=True)

    result = distill(args.pairs, args.teacher, args.out, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, limit=args.limit, max_prompt_tokens=args.max_prompt_tokens,
                     exclude=exclude, on_batch=report)
    print(file=sys.stderr)
    print(f"distilled pairs in {result.out}")
    for label, value in result.summary_rows():
        print(f" {label:<16}  {value:>10}")
    return result
