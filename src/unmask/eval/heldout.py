"""Held-out text for the evaluations: the validation split a model was trained without, or named files.

``--data`` may name

- a token shard directory (``unmask data build``): its ``val`` shards (perplexity) or the
  validation files its manifest lists (syntax);
- a trainer's token cache directory holding ``val.npy``, or a ``.npy`` token file (perplexity);
- source files, directories or globs, all of which are then treated as held out.

Without ``--data`` the split comes from the model's training record (``training.json``): its
shard directory, its validation token file, or for a model trained straight from source paths
the same split rebuilt (same files, same duplicate removal, same content-hash rule, same token
budget), so the tokens are the ones the trainer validates on. A model with no record (a
published checkpoint) gets the standard library files the content-hash rule holds out at
``val_fraction`` 0.02; whether that model saw them is unknown, and the source line says so.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unmask.errors import UnmaskError
from unmask.tokenizer import Tokenizer
from unmask.train.build import split_documents, tokenizer_hash
from unmask.train.corpus import corpus_files, find_files, iter_texts, read_text
from unmask.train.data import load_token_file
from unmask.train.shards import open_split, read_manifest, token_dtype

STDLIB = "{stdlib}"
FALLBACK_FRACTION = 0.02


@dataclass
class HeldOut:
    """Held-out documents and where they came from."""

    documents: list[tuple[str, str]]  # (file name, text), in the split's order
    source: str  # one line saying what these are
    budget: int | None = None  # the trainer's cap on the split's tokens (None: no cap)


def _record_data(training: dict[str, Any]) -> dict[str, Any]:
    """The data section of a training record: the trainer's full config, or a model card's summary of it."""
    config = training.get("config")
    data = config.get("data") if isinstance(config, dict) else training.get("data")
    return data if isinstance(data, dict) else {}


def _recorded_shards(d: dict[str, Any]) -> Path:
    """The shard directory a training record names, which must exist here."""
    path = Path(d["shards"])
    if not (path / "manifest.json").is_file():
        raise UnmaskError(
            f"the model was trained on the shard directory {path}, which is not here (paths are relative to the "
            "working directory); rebuild it with the commands in the model card, or pass --data"
        )
    return path


def _split(patterns: Sequence[str], suffixes: Sequence[str], fraction: float, max_files: int | None) -> list[tuple[str, str]]:
    """The validation documents of a corpus, by the trainer's content-hash rule."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = corpus_files([p.replace(STDLIB, stdlib) for p in patterns], suffixes)
    named, texts = {}, []
    for path, text in iter_texts(files):
        digest = hashlib.sha256(text.encode()).hexdigest()
        named[digest] = str(path)
        texts.append((digest, text))
    _, val = split_documents(texts, fraction, max_files)
    return [(named[d], text) for d, text in val]


def _shard_documents(root: Path) -> HeldOut:
    manifest = read_manifest(root)
    docs = []
    listed = [f for f in manifest.get("files", []) if f.get("split") == "val" and f.get("record") is None]
    for entry in listed:
        text = read_text(Path(entry["path"]))
        if text is not None and hashlib.sha256(text.encode()).hexdigest() == entry.get("hash"):
            docs.append((entry["path"], text))
    if not docs:
        raise UnmaskError(f"{root}: none of the {len(listed)} validation files its manifest lists are readable here unchanged")
    return HeldOut(docs, f"validation files of the shard directory {root} ({len(docs)} of {len(listed)} found unchanged)")


def heldout_documents(training: dict[str, Any], data: Sequence[str] | None = None, suffixes: Sequence[str] = (".py",)) -> HeldOut:
    """The held-out documents for a model with training record ``training`` (or the files in ``data``)."""
    if data:
        if len(data) == 1 and (Path(data[0]) / "manifest.json").is_file() and not (Path(data[0]) / "val.npy").is_file():
            return _shard_documents(Path(data[0]))
        docs = [(str(path), text) for path, text in iter_texts(find_files(data, tuple(suffixes)))]
        if not docs:
            raise UnmaskError(f"no readable files with suffixes {tuple(suffixes)} in {' '.join(data)}")
        return HeldOut(docs, f"{len(docs)} named files ({' '.join(data)})")
    d = _record_data(training)
    if d.get("shards"):
        return _shard_documents(_recorded_shards(d))
    if d.get("paths"):
        fraction = float(d.get("val_fraction") or 0.0)
        if fraction <= 0:
            raise UnmaskError("the model's training record holds no validation split (val_fraction 0); pass --data")
        try:
            docs = _split(d["paths"], d.get("suffixes") or [".py"], fraction, d.get("max_files"))
        except UnmaskError as exc:
            raise UnmaskError(f"cannot rebuild the validation split of the model's training data ({exc}); pass --data") from None
        budget = max(1, round(d["max_tokens"] * fraction)) if d.get("max_tokens") else None
        where = ", ".join(d["paths"])
        return HeldOut(docs, f"validation split of the model's training data ({len(docs)} files of {where}, val_fraction {fraction})", budget)
    docs = _split([STDLIB], suffixes, FALLBACK_FRACTION, None)
    return HeldOut(
        docs,
        f"{len(docs)} standard library files held out by the content-hash rule at val_fraction {FALLBACK_FRACTION} "
        f"({sysconfig.get_paths()['stdlib']}); the model has no training record, so whether it saw them is unknown",
    )


def encode_documents(tokenizer: Tokenizer, documents: Sequence[tuple[str, str]], budget: int | None) -> np.ndarray:
    """Token ids of the documents, each followed by EOS, cut at ``budget`` tokens."""
    if tokenizer.eos_id is None:
        raise UnmaskError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for start in range(0, len(documents), 64):
        for doc in tokenizer.encode_batch([text for _, text in documents[start : start + 64]]):
            ids += doc + [tokenizer.eos_id]
        if budget is not None and len(ids) >= budget:
            break
    return np.asarray(ids[:budget] if budget is not None else ids, dtype=token_dtype(tokenizer.vocab_size))


def _directory_tokens(tokenizer: Tokenizer, path: Path) -> tuple[np.ndarray, str]:
    if (path / "val.npy").is_file():
        return np.asarray(load_token_file(path / "val.npy")), f"validation tokens {path / 'val.npy'}"
    manifest = read_manifest(path)
    if (manifest.get("tokenizer") or {}).get("hash") != tokenizer_hash(tokenizer):
        raise UnmaskError(f"{path}: the shards were tokenised with another tokenizer than the model's")
    parts = open_split(path, "val", manifest)
    if not parts:
        raise UnmaskError(f"{path}: the shard directory has no validation shards")
    return np.concatenate([np.asarray(p) for p in parts]), f"validation shards of {path}"


def heldout_tokens(tokenizer: Tokenizer, training: dict[str, Any], data: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """A flat array of held-out token ids (documents joined by EOS) and a line saying where it came from."""
    if data and len(data) == 1:
        path = Path(data[0])
        if path.suffix == ".npy" and path.is_file():
            return np.asarray(load_token_file(path)), f"token file {path}"
        if path.is_dir() and (path / "manifest.json").is_file():
            return _directory_tokens(tokenizer, path)
    d = _record_data(training)
    if not data and d.get("shards"):
        return _directory_tokens(tokenizer, _recorded_shards(d))
    if not data and d.get("val_tokens"):
        path = Path(d["val_tokens"])
        if not path.is_file():
            raise UnmaskError(f"the model was validated on {path}, which is not here; pass --data")
        return np.asarray(load_token_file(path)), f"validation token file of the training run ({path})"
    held = heldout_documents(training, data)
    return encode_documents(tokenizer, held.documents, held.budget), held.source
