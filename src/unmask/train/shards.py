"""The on-disk format of a token shard directory, and reading one back (memory-mapped).

A directory written by ``unmask data build``::

    manifest.json        what was built: sources, settings, tokenizer hash, every kept file
                         (path, content hash, tokens, shard), skipped files by reason, totals,
                         and each shard with its plan key and whether it is finished
    tokenizer/           a copy of the tokenizer the tokens came from
    train-00000.npy ...  1-D uint16 (vocabulary <= 65536) or uint32 arrays of token ids,
    val-00000.npy ...    each document followed by EOS

Shard files are written to a temporary name and renamed, and the manifest is rewritten
(atomically) after every finished shard, so an interrupted build leaves only whole shards
behind and a re-run picks up where it stopped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from unmask.errors import UnmaskError
from unmask.files import read_json_object

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "unmask-token-shards"
VERSION = 1
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def write_array_atomic(path: Path, arr: np.ndarray) -> None:
    """``numpy.save`` through a temporary file and a rename: a reader never sees half a shard."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, arr)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory; anything that is not one is an ``UnmaskError``."""
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise UnmaskError(f"{root}: not a token shard directory (no {MANIFEST_NAME}); make one with `unmask data build`")
    manifest = read_json_object(path, missing_ok=False)
    if manifest.get("format") != FORMAT:
        raise UnmaskError(f"{path}: not an unmask token shard manifest")
    if manifest.get("version") != VERSION:
        raise UnmaskError(f"{path}: shard format version {manifest.get('version')}, this unmask reads {VERSION}")
    return manifest


def load_shard(root: Path, shard: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """One finished shard, memory-mapped read-only and checked against the manifest."""
    path = root / shard["file"]
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UnmaskError(f"{path}: shard file missing; run `unmask data build` again to rebuild it") from None
    except (OSError, ValueError) as exc:
        raise UnmaskError(f"{path}: not a readable shard ({exc})") from None
    if arr.ndim != 1 or arr.dtype != dtype or arr.size != shard["tokens"]:
        raise UnmaskError(
            f"{path}: expected {shard['tokens']} {dtype.name} tokens, found {arr.size} {arr.dtype.name}; rebuild the shards"
        )
    return arr


def open_split(root: str | Path, split: str, manifest: dict[str, Any] | None = None) -> list[np.ndarray]:
    """The shards of one split (``train`` or ``val``), in order, memory-mapped."""
    root = Path(root)
    manifest = read_manifest(root) if manifest is None else manifest
    if not manifest.get("complete"):
        raise UnmaskError(f"{root}: the shard build did not finish; run the same `unmask data build` again to complete it")
    dtype = np.dtype(manifest["dtype"])
    return [load_shard(root, s, dtype) for s in manifest["shards"] if s["split"] == split]


def shards_fingerprint(manifest: dict[str, Any]) -> list[list[Any]]:
    """What identifies the tokens of a shard directory: each shard's name, plan key and length."""
    return [[s["name"], s["key"], s["tokens"]] for s in manifest["shards"]]
