"""Token data for training: token streams (flat arrays or memory-mapped shards) cut into windows.

A split is a ``TokenStream``: one or more 1-D arrays of token ids (documents joined by EOS)
read as if they were one. ``TokenWindows`` samples training windows of ``seq_len`` tokens
without replacement: each epoch lays the stream out as non-overlapping windows from a random
offset and visits them in a random order, both drawn from (seed, epoch). The windows of a step
are a pure function of (seed, step), which makes resuming exact and lets ``torchrun`` processes
split a global batch between them without talking (each takes its own micro-batches).
Validation uses a fixed, evenly spaced set of windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmask.errors import UnmaskError
from unmask.train.shards import open_split, read_manifest, shards_fingerprint


class TokenStream:
    """A sequence of token arrays (e.g. memory-mapped shards) read as one flat array."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [p for p in parts if p.size]
        self.offsets = np.cumsum([0] + [p.size for p in self.parts])
        self.dtype = self.parts[0].dtype if self.parts else np.dtype(np.uint16)

    @property
    def size(self) -> int:
        return int(self.offsets[-1])

    def truncate(self, n: int) -> TokenStream:
        """The first ``n`` tokens."""
        out, left = [], n
        for part in self.parts:
            if left <= 0:
                break
            out.append(part[:left])
            left -= part.size
        return TokenStream(out)

    def take(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 windows ``[len(starts), length]``; a window may span two arrays."""
        if len(self.parts) == 1:
            idx = np.asarray(starts)[:, None] + np.arange(length)[None, :]
            return self.parts[0][idx].astype(np.int64)
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(np.asarray(starts).tolist()):
            filled = 0
            part = int(np.searchsorted(self.offsets, start, side="right")) - 1
            pos = start - int(self.offsets[part])
            while filled < length:
                piece = self.parts[part][pos : pos + length - filled]
                out[row, filled : filled + piece.size] = piece
                filled += piece.size
                part, pos = part + 1, 0
        return out

    def max_id(self) -> int:
        return max((int(p.max()) for p in self.parts), default=-1)

    def digest(self) -> str:
        h = hashlib.sha256()
        for part in self.parts:
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()[:16]


@dataclass
class TokenData:
    """The two token streams of a run and where they came from."""

    train: TokenStream
    val: TokenStream
    info: dict[str, Any]  # source, file and token counts
    fingerprint: str  # identifies the training tokens: a checkpoint resumes only on the same ones
    max_id: int  # largest token id in either split (-1 when both are empty)


def load_token_file(path: str | Path) -> np.ndarray:
    """A pre-tokenised 1-D integer array saved with ``numpy.save``, memory-mapped (never unpickled)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UnmaskError(f"{path}: token file not found") from None
    except (OSError, ValueError) as exc:
        raise UnmaskError(f"{path}: not a readable .npy array ({exc})") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise UnmaskError(f"{path}: expected a 1-D integer array, got {arr.dtype} with shape {arr.shape}")
    return arr


def token_files_data(train_path: str, val_path: str | None) -> TokenData:
    """Data from ``[data] train_tokens`` / ``val_tokens``."""
    train = TokenStream([load_token_file(train_path)])
    val = TokenStream([load_token_file(val_path)] if val_path else [])
    info = {"source": {"train_tokens": train_path, "val_tokens": val_path}, "tokens": {"train": train.size, "val": val.size}}
    return TokenData(train, val, info, train.digest(), max(train.max_id(), val.max_id()))


def token_budgets(max_tokens: int | None, val_fraction: float, has_val: bool) -> tuple[int | None, int | None]:
    """(train, val) token caps that together make ``max_tokens`` (None: no cap)."""
    if max_tokens is None:
        return None, None
    val = max(1, round(max_tokens * val_fraction)) if has_val else 0
    return max_tokens - val, val


def shard_data(root: str | Path, max_tokens: int | None = None) -> TokenData:
    """Data from a shard directory (``unmask data build``), memory-mapped, optionally capped."""
    manifest = read_manifest(root)
    train = TokenStream(open_split(root, "train", manifest))
    val = TokenStream(open_split(root, "val", manifest))
    train_cap, val_cap = token_budgets(max_tokens, manifest["settings"]["val_fraction"], val.size > 0)
    if train_cap is not None:
        train, val = train.truncate(train_cap), val.truncate(val_cap or 0)
    totals = manifest["totals"]
    info = {
        "source": {"shards": str(root)},
        "files": {split: sum(s["files"] for s in manifest["shards"] if s["split"] == split) for split in ("train", "val")},
        "tokens": {"train": train.size, "val": val.size},
        "skipped": totals["skipped"],
        "tokenizer_hash": manifest["tokenizer"]["hash"],
    }
    key = repr([shards_fingerprint(manifest), max_tokens]).encode()
    max_id = max((s["max_id"] for s in manifest["shards"]), default=-1)
    return TokenData(train, val, info, hashlib.sha256(key).hexdigest()[:16], max_id)


def step_rng(seed: int, step: int, micro: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, step, micro-step, stream): noise is a function of the step."""
    return np.random.default_rng([seed, step, micro, stream])


def step_torch_generator(seed: int, step: int, micro: int, stream: int) -> torch.Generator:
    """A CPU torch generator seeded from (seed, step, micro-step, stream)."""
    value = int(np.random.SeedSequence([seed, step, micro, stream]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(value)


class TokenWindows:
    """Windows of ``seq_len`` consecutive tokens of a stream, sampled epoch by epoch without replacement."""

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int, name: str = "data") -> None:
        self.stream = tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])
        if self.stream.size < seq_len:
            raise UnmaskError(
                f"the {name} split has {self.stream.size} tokens, fewer than seq_len {seq_len}; add data or lower seq_len"
            )
        self.seq_len = seq_len
        self.max_offset = min(seq_len - 1, self.stream.size - seq_len)
        self.n_windows = (self.stream.size - self.max_offset) // seq_len  # windows per epoch, whatever the offset
        self._epochs: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def epoch(self, seed: int, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, order) of an epoch: windows start at offset + order[j] * seq_len."""
        key = (seed, epoch)
        if key not in self._epochs:
            rng = np.random.default_rng([seed, epoch, 2])
            offset = int(rng.integers(0, self.max_offset + 1))
            self._epochs = {k: v for k, v in self._epochs.items() if k[1] >= epoch - 1}
            self._epochs[key] = (offset, rng.permutation(self.n_windows))
        return self._epochs[key]

    def starts(self, batch_size: int, seed: int, step: int, micro: int = 0, micro_batches: int = 1) -> np.ndarray:
        """Start positions of micro-batch ``micro`` of step ``step`` (``micro_batches`` per step)."""
        index = (step * micro_batches + micro) * batch_size + np.arange(batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for i, g in enumerate(index.tolist()):
            offset, order = self.epoch(seed, g // self.n_windows)
            out[i] = offset + int(order[g % self.n_windows]) * self.seq_len
        return out

    def batch(self, batch_size: int, seed: int, step: int, micro: int = 0, micro_batches: int = 1) -> torch.Tensor:
        """Windows [batch_size, seq_len] (int64) of micro-batch ``micro`` of step ``step``."""
        return torch.from_numpy(self.stream.take(self.starts(batch_size, seed, step, micro, micro_batches), self.seq_len))

    def fixed(self, n: int) -> torch.Tensor:
        """``n`` evenly spaced windows [n, seq_len] (non-overlapping when the stream is long enough)."""
        last = self.stream.size - self.seq_len
        starts = np.linspace(0, last, num=n).round().astype(np.int64) if n > 1 else np.zeros(1, dtype=np.int64)
        return torch.from_numpy(self.stream.take(starts, self.seq_len))
