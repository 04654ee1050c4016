"""Finding and reading the text files a tokenizer or a model is trained on."""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from unmask.errors import UnmaskError

DEFAULT_SUFFIXES = (".py",)


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


def read_text(path: Path, max_bytes: int = 1 << 20) -> str | None:
    """The file's UTF-8 text, or None if it is unreadable, binary, empty or larger than ``max_bytes``."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data or len(data) > max_bytes or b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


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
