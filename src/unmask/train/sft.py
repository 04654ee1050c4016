"""SFT data: prompt/answer examples from JSON Lines, tokenised once, padded into windows.

A line of the JSONL file is one example, in one of two forms (other keys, e.g. ``source``, are
ignored)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "def add(a, b):\\n", "completion": "    return a + b\\n"}

- **chat**: rendered with the tokenizer's chat template (``Tokenizer.encode_chat``: markup may be
  special tokens, contents never). The answer is the last message, which must be the
  assistant's; the prompt is everything before it plus the template's generation prompt, and
  the full rendering must start with exactly those ids (it does for ChatML-style templates).
- **plain**: the prompt's ids, then the completion's ids and EOS (each encoded alone, as a
  prompt is at inference).

``build_sft`` tokenises a file once into a directory (``out_dir/sft`` for the trainer)::

    manifest.json     format, sources (path, SHA-256, bytes), tokenizer hash, counts, lengths
    train-tokens.npy  1-D uint16/uint32 ids of every example, one after the other
    train-index.npy   int64 [n, 3]: (start, prompt length, length) of each example
    val-tokens.npy, val-index.npy

and a later build with the same key (sources, tokenizer, split settings) reuses it. Exact
duplicates (same rendered record) are kept once; with no separate validation file an example
goes to validation when the first 64 bits of its SHA-256, read as a fraction, fall below
``val_fraction``; with one, training examples that also occur in it are dropped.

``SFTWindows`` lays each example at the start of its own ``seq_len`` window: examples never
share a window, so no attention mode can leak one into another. The rest of the window is
filled according to ``pad``: ``"eos"`` (default, LLaDA's recipe) fills it with EOS tokens that
count as answer (the model learns where an answer ends inside a longer canvas of masks);
``"ignore"`` fills it with the pad id and marks it fixed like the prompt (never masked, never a
target). An example longer than ``seq_len`` is skipped, never cut, and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmask.errors import UnmaskError
from unmask.files import read_json_object
from unmask.train.shards import token_dtype, write_array_atomic, write_json_atomic

FORMAT = "unmask-sft"
VERSION = 1
MANIFEST_NAME = "manifest.json"
PAD_MODES = ("eos", "ignore")
MAX_LINE_BYTES = 16 << 20  # a longer line is not an example


@dataclass
class SFTExamples:
    """The examples of one split: ids one after the other and where each starts."""

    tokens: np.ndarray  # [T] token ids
    index: np.ndarray  # [n, 3] int64: start, prompt length, total length

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def max_id(self) -> int:
        return int(self.tokens.max()) if self.tokens.size else -1


@dataclass
class SFTData:
    """Both splits of an SFT run, as the trainer uses them (``TokenData``'s counterpart)."""

    train: SFTExamples
    val: SFTExamples
    info: dict[str, Any]  # source, counts
    fingerprint: str  # identifies the examples: a checkpoint resumes only on the same ones
    max_id: int


def _fail(path: Path, line: int, message: str) -> UnmaskError:
    return UnmaskError(f"{path}:{line}: {message}")


def _text_field(record: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _fail(path, line, f"{key!r} must be a string, got {type(value).__name__}")
    return value


def _parse(raw: bytes, path: Path, line: int) -> dict[str, Any]:
    """One JSONL line as a checked record: ``{"messages": [...]}`` or ``{"prompt": ..., "completion": ...}``."""
    if len(raw) > MAX_LINE_BYTES:
        raise _fail(path, line, f"line longer than {MAX_LINE_BYTES >> 20} MiB")
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        raise _fail(path, line, "not UTF-8") from None
    except ValueError as exc:
        raise _fail(path, line, f"not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(record, dict):
        raise _fail(path, line, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        if "prompt" in record or "completion" in record:
            raise _fail(path, line, "give either 'messages' or 'prompt' + 'completion', not both")
        messages = record["messages"]
        if not isinstance(messages, list) or len(messages) < 2:
            raise _fail(path, line, "'messages' must be a list of at least two messages (a request, then the answer)")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _fail(path, line, f"message {k} must be an object with string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise _fail(path, line, f"the last message is the answer and must be the assistant's, not {messages[-1]['role']!r}")
        if not messages[-1]["content"]:
            raise _fail(path, line, "the answer (last message) is empty")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    if "prompt" in record and "completion" in record:
        prompt, completion = _text_field(record, "prompt", path, line), _text_field(record, "completion", path, line)
        if not completion:
            raise _fail(path, line, "'completion' is empty")
        return {"prompt": prompt, "completion": completion}
    raise _fail(path, line, "expected 'messages' or 'prompt' + 'completion'")


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) for every non-blank line; a bad line is an ``UnmaskError`` naming it."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as exc:
        raise UnmaskError(f"{path}: cannot read SFT data ({exc.strerror or exc})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, _parse(raw, path, number)


def encode_example(record: dict[str, Any], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a checked record (see the module docstring)."""
    if "messages" in record:
        messages = record["messages"]
        prompt = tokenizer.encode_chat(messages[:-1], add_generation_prompt=True)
        full = tokenizer.encode_chat(messages, add_generation_prompt=False)
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            raise UnmaskError("the chat template does not render a conversation as its prompt followed by the answer")
        return prompt, full[len(prompt):]
    if tokenizer.eos_id is None:
        raise UnmaskError("prompt/completion examples need a tokenizer with an EOS token")
    return tokenizer.encode(record["prompt"]), tokenizer.encode(record["completion"]) + [tokenizer.eos_id]


def record_hash(record: dict[str, Any]) -> bytes:
    """SHA-256 of a record's canonical JSON: duplicates and the validation split are decided by it."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).digest()


def is_val(digest: bytes, fraction: float) -> bool:
    """Whether the record whose SHA-256 is ``digest`` is held out (its first 64 bits, as a fraction, below ``fraction``)."""
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def _file_facts(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise UnmaskError(f"{path}: cannot read SFT data ({exc.strerror or exc})") from None
    return {"path": str(path), "sha256": h.hexdigest(), "bytes": path.stat().st_size}


def _encode_file(path: Path, tokenizer: Any) -> Iterator[tuple[bytes, list[int], list[int]]]:
    for number, record in read_records(path):
        try:
            prompt, answer = encode_example(record, tokenizer)
        except UnmaskError as exc:
            raise _fail(path, number, str(exc)) from None
        yield record_hash(record), prompt, answer


def _lengths(index: np.ndarray) -> dict[str, int]:
    if not len(index):
        return {}
    lengths = index[:, 2]
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())}


def build_sft(
    path: str | Path, out_dir: str | Path, tokenizer: Any, *, val_path: str | Path | None = None, val_fraction: float = 0.02,
) -> dict[str, Any]:
    """Tokenise the SFT file(s) into ``out_dir`` (reused when already built the same way); returns the manifest."""
    from unmask.train.build import tokenizer_hash

    out = Path(out_dir)
    sources = {"train": _file_facts(Path(path)), "val": None if val_path is None else _file_facts(Path(val_path))}
    settings = {"val_fraction": None if val_path is not None else val_fraction}
    key = hashlib.sha256(json.dumps([VERSION, [s and s["sha256"] for s in sources.values()], tokenizer_hash(tokenizer),
                                     settings]).encode()).hexdigest()[:16]
    try:
        old = read_json_object(out / MANIFEST_NAME)
        if old.get("format") == FORMAT and old.get("key") == key:
            return old
    except UnmaskError:  # damaged: built again
        pass
    dtype = token_dtype(tokenizer.vocab_size)
    held_out: set[bytes] = set()
    seen: set[bytes] = set()
    rows: dict[str, list[tuple[list[int], list[int]]]] = {"train": [], "val": []}
    counts = {"lines": 0, "duplicate": 0, "in_val_file": 0}
    if val_path is not None:
        for digest, prompt, answer in _encode_file(Path(val_path), tokenizer):
            counts["lines"] += 1
            if digest in held_out:
                counts["duplicate"] += 1
                continue
            held_out.add(digest)
            rows["val"].append((prompt, answer))
    for digest, prompt, answer in _encode_file(Path(path), tokenizer):
        counts["lines"] += 1
        if digest in held_out:
            counts["in_val_file"] += 1
        elif digest in seen:
            counts["duplicate"] += 1
        else:
            seen.add(digest)
            split = "val" if val_path is None and is_val(digest, val_fraction) else "train"
            rows[split].append((prompt, answer))
    out.mkdir(parents=True, exist_ok=True)
    examples, tokens = {}, {}
    for split, items in rows.items():
        index = np.zeros((len(items), 3), dtype=np.int64)
        flat: list[int] = []
        for k, (prompt, answer) in enumerate(items):
            index[k] = (len(flat), len(prompt), len(prompt) + len(answer))
            flat += prompt + answer
        write_array_atomic(out / f"{split}-tokens.npy", np.asarray(flat, dtype=dtype))
        write_array_atomic(out / f"{split}-index.npy", index)
        examples[split], tokens[split] = len(items), len(flat)
        counts[f"lengths_{split}"] = _lengths(index)
    if not examples["train"]:
        raise UnmaskError(f"{path}: no training examples (every line is a duplicate or in the validation file)")
    manifest = {
        "format": FORMAT, "version": VERSION, "key": key, "sources": sources, "settings": settings,
        "tokenizer": {"hash": tokenizer_hash(tokenizer), "vocab_size": tokenizer.vocab_size}, "dtype": dtype.name,
        "examples": examples, "tokens": tokens, "counts": counts,
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def open_sft(root: str | Path, split: str) -> SFTExamples:
    """One split of a built SFT directory, memory-mapped and checked."""
    root = Path(root)
    try:
        tokens = np.load(root / f"{split}-tokens.npy", mmap_mode="r", allow_pickle=False)
        index = np.load(root / f"{split}-index.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UnmaskError(f"{root}: unreadable SFT {split} split ({exc}); delete the directory to rebuild it") from None
    ok = tokens.ndim == 1 and index.ndim == 2 and index.shape[1] == 3
    if ok and len(index):
        start, plen, length = index[:, 0], index[:, 1], index[:, 2]
        ok = bool((start >= 0).all() and (plen >= 0).all() and (plen < length).all() and (start + length <= tokens.size).all())
    if not ok:
        raise UnmaskError(f"{root}: the SFT {split} split is damaged; delete the directory to rebuild it")
    return SFTExamples(tokens, np.asarray(index))


def sft_data(root: str | Path, pad: str = "eos") -> SFTData:
    """The examples of a directory made by ``build_sft``, memory-mapped."""
    try:
        manifest = read_json_object(Path(root) / MANIFEST_NAME, missing_ok=False)
    except UnmaskError as exc:
        raise UnmaskError(f"{root}: not an SFT data directory ({exc})") from None
    train, val = open_sft(root, "train"), open_sft(root, "val")
    info = {"source": manifest["sources"], "examples": manifest["examples"], "tokens": manifest["tokens"],
            "counts": manifest["counts"], "pad": pad}
    fingerprint = hashlib.sha256(repr([manifest["key"], pad]).encode()).hexdigest()[:16]
    return SFTData(train, val, info, fingerprint, max(train.max_id(), val.max_id()))


class SFTWindows:
    """One example per ``seq_len`` window, visited epoch by epoch without replacement.

    A batch is ``(ids [B, L], fixed [B, L])`` where ``fixed`` is True on the prompt (and on the
    padding when ``pad = "ignore"``): the ``prompt_mask`` of the objectives. The examples of a
    step are a pure function of (seed, step, micro-step), as ``TokenWindows``' windows are.
    """

    def __init__(self, examples: SFTExamples, seq_len: int, fill_id: int, pad: str = "eos", name: str = "train") -> None:
        if pad not in PAD_MODES:
            raise UnmaskError(f"[data] sft_pad must be one of {list(PAD_MODES)}, got {pad!r}")
        self.examples, self.seq_len, self.fill_id, self.pad = examples, seq_len, fill_id, pad
        self.keep = np.flatnonzero(examples.index[:, 2] <= seq_len) if len(examples) else np.zeros(0, dtype=np.int64)
        self.too_long = len(examples) - int(self.keep.size)
        if not self.keep.size:
            raise UnmaskError(f"the SFT {name} split has no example of at most seq_len {seq_len} tokens "
                              f"({self.too_long} longer); raise seq_len")
        self._epochs: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.keep.size)

    def rows(self, which: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows of the kept examples ``which`` (positions in ``keep``)."""
        ids = np.full((len(which), self.seq_len), self.fill_id, dtype=np.int64)
        fixed = np.zeros((len(which), self.seq_len), dtype=bool)
        for row, k in enumerate(np.asarray(which).tolist()):
            start, plen, length = (int(v) for v in self.examples.index[self.keep[k]])
            ids[row, :length] = self.examples.tokens[start : start + length]
            fixed[row, :plen] = True
            if self.pad == "ignore":
                fixed[row, length:] = True
        return torch.from_numpy(ids), torch.from_numpy(fixed)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._epochs:
            self._epochs = {k: v for k, v in self._epochs.items() if k[1] >= epoch - 1}
            self._epochs[key] = np.random.default_rng([seed, epoch, 3]).permutation(len(self))
        return self._epochs[key]

    def batch(self, batch_size: int, seed: int, step: int, micro: int = 0, micro_batches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, fixed) of micro-batch ``micro`` of step ``step``."""
        index = (step * micro_batches + micro) * batch_size + np.arange(batch_size)
        n = len(self)
        return self.rows(np.array([self.order(seed, g // n)[g % n] for g in index.tolist()], dtype=np.int64))

    def fixed(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``min(n, examples)`` evenly spaced examples, each once: the validation set."""
        n = min(n, len(self))
        return self.rows(np.linspace(0, len(self) - 1, num=n).round().astype(np.int64))


def sft_windows(data: SFTData, tokenizer: Any, seq_len: int, pad: str, n_val: int) -> tuple[SFTWindows, tuple[torch.Tensor, torch.Tensor] | None]:
    """Training windows and the fixed validation batch (None without validation examples) of a run;
    records in ``data.info`` how many examples were too long for ``seq_len``."""
    fill = tokenizer.eos_id if pad == "eos" else (tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id)
    if fill is None:
        raise UnmaskError(f"[data] sft_pad = {pad!r} needs a tokenizer with an {'EOS' if pad == 'eos' else 'pad or EOS'} token")
    train = SFTWindows(data.train, seq_len, fill, pad, "train")
    val = SFTWindows(data.val, seq_len, fill, pad, "validation") if len(data.val) else None
    data.info["too_long"] = {"train": train.too_long, "val": 0 if val is None else val.too_long, "seq_len": seq_len}
    return train, None if val is None else val.fixed(n_val)
