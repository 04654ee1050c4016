"""Reading the small files of a model directory (JSON, tokenizer, template) without trusting them.

One reader for all of them: a regular file only (a FIFO or a device named ``config.json`` would
block for ever or never end), opened without blocking and checked after opening, read up to a
size cap, decoded as UTF-8, parsed as a JSON object where one is expected. Every problem is an
``UnmaskError`` that names the file on one line.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError

MAX_FILE_BYTES = 64 << 20  # largest JSON / tokenizer / template file read (a 150k-token tokenizer.json is ~10 MB)


def check_regular(path: Path) -> None:
    """Refuse anything but a regular file (followed through links) before a library opens ``path``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UnmaskError(f"{path}: file not found") from None
    except OSError as exc:
        raise UnmaskError(f"{path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UnmaskError(f"{path}: not a regular file ({_kind(mode)})")


def read_bytes(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise UnmaskError(f"{path}: file not found") from None
    except OSError as exc:
        raise UnmaskError(f"{path}: cannot read it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnmaskError(f"{path}: not a regular file ({_kind(mode)})")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnmaskError(f"{path}: larger than {max_bytes >> 20} MiB; refusing to read it")
    return data


def read_text(path: Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    try:
        return read_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnmaskError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_json(path: Path, max_bytes: int = MAX_FILE_BYTES) -> Any:
    text = read_text(path, max_bytes)
    try:
        return json.loads(text)
    except RecursionError:
        raise UnmaskError(f"{path}: not valid JSON (nested too deeply)") from None
    except json.JSONDecodeError as exc:
        raise UnmaskError(f"{path}: not valid JSON ({exc})") from None


def read_json_object(path: Path, missing_ok: bool = True) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when there is no such file and ``missing_ok``."""
    if missing_ok and not os.path.lexists(path):
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise UnmaskError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"
