"""Token data for training: a corpus tokenised once into cached arrays, cut into windows.

Files are split into train/validation by a hash of their content, so no file (and no copy of
one) is ever in both. Each split is one flat array of token ids with documents joined by EOS.
A training batch is a set of random windows drawn from a generator seeded by
(seed, step, micro-step): the batch of a step is a pure function of the step, which makes
resuming from a checkpoint exact. Validation uses a fixed, evenly spaced set of windows.

This module needs no tokenizer object: it takes an ``encode_batch`` function, and everything
below the cache works on plain numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unmask.errors import UnmaskError
from unmask.train.corpus import find_files, iter_texts

MANIFEST_NAME = "manifest.json"
EncodeBatch = Callable[[Sequence[str]], list[list[int]]]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def content_score(digest: str) -> float:
    """A number in [0, 1) from a content hash: the file's place in the split and in the sample order."""
    return int(digest[:16], 16) / float(1 << 64)


def corpus_files(patterns: Sequence[str], suffixes: Sequence[str]) -> list[Path]:
    """The corpus files; installed packages under the standard library (site-packages) are left out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    out = []
    for path in find_files(patterns, tuple(suffixes)):
        resolved = path.resolve()
        if resolved.is_relative_to(stdlib):
            parts = resolved.relative_to(stdlib).parts
            if "site-packages" in parts or "dist-packages" in parts:
                continue
        out.append(path)
    return out


def dir_hash(directory: str | Path) -> str:
    """SHA-256 over the names and contents of the files in a directory (e.g. a tokenizer)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def files_hash(files: Sequence[Path]) -> str:
    """A cheap fingerprint of a file list: paths, sizes and modification times."""
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def split_documents(
    texts: Sequence[tuple[str, str]], val_fraction: float, max_files: int | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) lists of (digest, text), decided by the content hash alone.

    Documents come out in hash order (a uniform sample when truncated by ``max_files``). When
    ``val_fraction`` > 0 and there are at least two documents, validation gets at least one.
    """
    docs = sorted(texts)
    if max_files is not None:
        docs = docs[:max_files]
    val = [d for d in docs if content_score(d[0]) < val_fraction]
    if val_fraction > 0 and not val and len(docs) >= 2:
        val = [docs[0]]
    val_set = {d[0] for d in val}
    train = [d for d in docs if d[0] not in val_set]
    return train, val


def encode_documents(
    docs: Sequence[tuple[str, str]], encode_batch: EncodeBatch, eos_id: int, dtype: np.dtype, budget: int | None, chunk: int = 64
) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, until ``budget`` tokens are reached."""
    parts: list[np.ndarray] = []
    total = 0
    for start in range(0, len(docs), chunk):
        for ids in encode_batch([text for _, text in docs[start : start + chunk]]):
            arr = np.asarray(ids + [eos_id], dtype=dtype)
            parts.append(arr)
            total += len(arr)
            if budget is not None and total >= budget:
                return np.concatenate(parts)[:budget]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@dataclass
class TokenData:
    """The two token arrays of a run and where they came from."""

    train: np.ndarray
    val: np.ndarray
    info: dict  # manifest: source fingerprint, file counts, token counts


def build_token_cache(
    files: Sequence[Path],
    encode_batch: EncodeBatch,
    eos_id: int,
    vocab_size: int,
    cache_dir: str | Path,
    *,
    source_key: dict,
    val_fraction: float,
    max_files: int | None = None,
    max_tokens: int | None = None,
) -> TokenData:
    """Tokenise ``files`` into ``cache_dir/{train,val}.npy``, or reuse them if ``source_key`` matches.

    ``source_key`` identifies everything the arrays depend on (tokenizer hash, file list, split
    settings); it is stored in the manifest and compared on the next run.
    """
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("source") == source_key:
                return TokenData(np.load(cache_dir / "train.npy"), np.load(cache_dir / "val.npy"), manifest)
        except (OSError, ValueError):
            pass
    texts = [(hashlib.sha256(text.encode()).hexdigest(), text) for _, text in iter_texts(files)]
    if not texts:
        raise UnmaskError("the data paths hold no readable text files")
    train_docs, val_docs = split_documents(texts, val_fraction, max_files)
    dtype = token_dtype(vocab_size)
    val_budget = None if max_tokens is None else max(1, round(max_tokens * val_fraction))
    train_budget = None if max_tokens is None else max_tokens - (val_budget if val_docs else 0)
    train = encode_documents(train_docs, encode_batch, eos_id, dtype, train_budget)
    val = encode_documents(val_docs, encode_batch, eos_id, dtype, val_budget)
    manifest = {
        "source": source_key,
        "files": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train": int(train.size), "val": int(val.size)},
        "dtype": dtype.name,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train", train), ("val", val)):
        tmp = cache_dir / f".{name}.{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, cache_dir / f"{name}.npy")
    tmp = cache_dir / f".{MANIFEST_NAME}.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return TokenData(train, val, manifest)


def load_token_file(path: str | Path) -> np.ndarray:
    """A pre-tokenised 1-D integer array saved with ``numpy.save`` (never unpickled)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UnmaskError(f"{path}: token file not found") from None
    except (OSError, ValueError) as exc:
        raise UnmaskError(f"{path}: not a readable .npy array ({exc})") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise UnmaskError(f"{path}: expected a 1-D integer array, got {arr.dtype} with shape {arr.shape}")
    return arr


def step_rng(seed: int, step: int, micro: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, step, micro-step, stream): batches are functions of the step."""
    return np.random.default_rng([seed, step, micro, stream])


def step_torch_generator(seed: int, step: int, micro: int, stream: int) -> torch.Generator:
    """A CPU torch generator seeded from (seed, step, micro-step, stream)."""
    value = int(np.random.SeedSequence([seed, step, micro, stream]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(value)


class TokenWindows:
    """Windows of ``seq_len`` consecutive tokens from one flat token array."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "data") -> None:
        if tokens.size < seq_len:
            raise UnmaskError(f"the {name} split has {tokens.size} tokens, fewer than seq_len {seq_len}; add data or lower seq_len")
        self.tokens = tokens
        self.seq_len = seq_len

    def _gather(self, starts: np.ndarray) -> torch.Tensor:
        idx = starts[:, None] + np.arange(self.seq_len)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))

    def batch(self, batch_size: int, seed: int, step: int, micro: int = 0) -> torch.Tensor:
        """Random windows [batch_size, seq_len] (int64) chosen by (seed, step, micro)."""
        rng = step_rng(seed, step, micro, stream=0)
        starts = rng.integers(0, self.tokens.size - self.seq_len + 1, size=batch_size)
        return self._gather(starts)

    def fixed(self, n: int) -> torch.Tensor:
        """``n`` evenly spaced windows [n, seq_len] (non-overlapping when the array is long enough)."""
        last = self.tokens.size - self.seq_len
        starts = np.linspace(0, last, num=n).round().astype(np.int64) if n > 1 else np.zeros(1, dtype=np.int64)
        return self._gather(starts)
