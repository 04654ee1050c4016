"""Finding and reading the documents a tokenizer or a model is trained on.

A document is a whole source file, one record of a JSON Lines file, or one row of a Parquet
file. Every reader returns either the document's text or the reason it was left out
(``unreadable``, ``binary``, ``oversized``, ``empty``, ``bad_record``): a corpus of thousands of
files always has a few odd ones, and none of them may stop a build.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError

DEFAULT_SUFFIXES = (".py",)
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
MAX_DOC_BYTES = 1 << 20  # documents larger than this (1 MiB) are generated or data, not code

UNREADABLE, BINARY, OVERSIZED, EMPTY, BAD_RECORD = "unreadable", "binary", "oversized", "empty", "bad_record"


def find_files(patterns: Iterable[str], suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> list[Path]:
    """Files named by paths, directories (searched recursively for ``suffixes``) or glob patterns.

    The result is sorted and free of repeats so that a corpus is the same on every run.
    """
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        else:
            matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
            if not matches:
                raise UnmaskError(f"{pattern}: no such file, directory or glob match")
            for match in matches:
                if match.is_dir():
                    found.update(p for p in match.rglob("*") if p.is_file() and p.suffix in suffixes)
                elif match.is_file():
                    found.add(match)
    return sorted(found)


def corpus_files(patterns: Iterable[str], suffixes: Iterable[str] = DEFAULT_SUFFIXES) -> list[Path]:
    """``find_files``, minus installed packages inside the standard library (``{stdlib}`` means the stdlib only)."""
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


def default_sources() -> list[str]:
    """The running interpreter's standard library and site-packages directories."""
    paths = sysconfig.get_paths()
    out: list[str] = []
    for key in ("stdlib", "purelib", "platlib"):
        value = paths.get(key)
        if value and Path(value).is_dir() and value not in out:
            out.append(value)
    return out


def decode_bytes(data: bytes, max_bytes: int = MAX_DOC_BYTES) -> tuple[str | None, str | None]:
    """(text, None) for UTF-8 text, else (None, reason)."""
    if len(data) > max_bytes:
        return None, OVERSIZED
    if not data.strip():
        return None, EMPTY
    if b"\x00" in data:
        return None, BINARY
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, BINARY


def read_document(path: Path, max_bytes: int = MAX_DOC_BYTES) -> tuple[str | None, str | None]:
    """A whole file as a document: (text, None), or (None, reason) when it is left out."""
    try:
        if path.stat().st_size > max_bytes:
            return None, OVERSIZED
        data = path.read_bytes()
    except OSError:
        return None, UNREADABLE
    return decode_bytes(data, max_bytes)


def read_text(path: Path, max_bytes: int = MAX_DOC_BYTES) -> str | None:
    """The file's UTF-8 text, or None if it is unreadable, binary, empty or larger than ``max_bytes``."""
    return read_document(path, max_bytes)[0]


def iter_texts(paths: Iterable[Path]) -> Iterator[tuple[Path, str]]:
    """(path, text) for every readable file, skipping exact duplicates by content hash."""
    seen: set[str] = set()
    for path in paths:
        text = read_text(path)
        if text is None:
            continue
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        yield path, text


def source_kind(path: Path) -> str:
    """``jsonl``, ``parquet`` or ``file`` (a whole file is one document)."""
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "file"


def record_text(record: Any, field: str, max_bytes: int = MAX_DOC_BYTES) -> tuple[str | None, str | None]:
    """The text field of one JSONL/Parquet record, or the reason it is left out."""
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        return None, BAD_RECORD
    if "\x00" in value:
        return None, BINARY
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        return None, OVERSIZED
    if not value.strip():
        return None, EMPTY
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a \ud800 escape
        return None, BINARY
    return value, None


@dataclass(frozen=True)
class JsonlLine:
    """Where one JSON Lines record is, so a worker can read it again without the rest of the file."""

    index: int  # 0-based line number
    offset: int  # byte offset of the line
    length: int  # byte length of the line (without the newline)


def scan_jsonl(path: Path) -> Iterator[tuple[JsonlLine, bytes]]:
    """Every non-blank line of a JSON Lines file with its position; OSError propagates."""
    offset = 0
    with path.open("rb") as f:
        for index, line in enumerate(f):
            stripped = line.rstrip(b"\r\n")
            if stripped.strip():
                yield JsonlLine(index, offset, len(stripped)), stripped
            offset += len(line)


def parse_jsonl_line(raw: bytes, field: str, max_bytes: int = MAX_DOC_BYTES) -> tuple[str | None, str | None]:
    try:
        record = json.loads(raw)
    except ValueError:  # invalid JSON or invalid UTF-8
        return None, BAD_RECORD
    return record_text(record, field, max_bytes)


def read_jsonl_line(path: Path, line: JsonlLine, field: str, max_bytes: int = MAX_DOC_BYTES) -> tuple[str | None, str | None]:
    try:
        with path.open("rb") as f:
            f.seek(line.offset)
            raw = f.read(line.length)
    except OSError:
        return None, UNREADABLE
    return parse_jsonl_line(raw, field, max_bytes)


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UnmaskError("reading Parquet files needs the 'pyarrow' package: pip install pyarrow") from None
    return pq


def scan_parquet(path: Path, field: str, max_bytes: int = MAX_DOC_BYTES) -> Iterator[tuple[int, str | None, str | None]]:
    """(row, text, reason) for every row of the ``field`` column of a Parquet file."""
    pq = _pyarrow_parquet()
    parquet = pq.ParquetFile(str(path))
    if field not in parquet.schema_arrow.names:
        raise ValueError(f"no column {field!r}")
    row = 0
    for batch in parquet.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            text, reason = record_text({field: value}, field, max_bytes)
            yield row, text, reason
            row += 1


class ParquetRows:
    """Reads single rows of Parquet files by number, one row group at a time (cached)."""

    def __init__(self, field: str, max_bytes: int = MAX_DOC_BYTES) -> None:
        self.field = field
        self.max_bytes = max_bytes
        self._key: tuple[str, int] | None = None
        self._values: list[Any] = []
        self._starts: dict[str, list[int]] = {}

    def read(self, path: Path, row: int) -> tuple[str | None, str | None]:
        pq = _pyarrow_parquet()
        try:
            parquet = pq.ParquetFile(str(path))
            starts = self._starts.get(str(path))
            if starts is None:
                starts = [0]
                for group in range(parquet.num_row_groups):
                    starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
                self._starts[str(path)] = starts
            group = next(g for g in range(len(starts) - 1) if starts[g] <= row < starts[g + 1])
            if self._key != (str(path), group):
                self._values = parquet.read_row_group(group, columns=[self.field]).column(0).to_pylist()
                self._key = (str(path), group)
        except (OSError, StopIteration, KeyError, ValueError):
            return None, UNREADABLE
        return record_text({self.field: self._values[row - starts[group]]}, self.field, self.max_bytes)
