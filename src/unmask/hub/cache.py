"""The cache's layout: where pulled models live and how an entry is named, recorded and replaced.

``$UNMASK_HOME/models/<org>--<name>/`` (``UNMASK_HOME`` defaults to ``$XDG_CACHE_HOME/unmask``,
i.e. ``~/.cache/unmask``). Each entry is a plain model directory plus ``.unmask-pull.json``, the
record of where it came from. A pull writes ``<org>--<name>.partial/`` and renames it once every
file is there, so the cache never holds half a model under a model's name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError
from unmask.files import read_json_object

RECORD_NAME = ".unmask-pull.json"
PARTIAL_SUFFIX = ".partial"
STALE_SUFFIX = ".old"

REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(f"{REPO_PART}/{REPO_PART}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,127}")


def cache_dir() -> Path:
    """Where pulled models live: ``$UNMASK_HOME/models``."""
    home = os.environ.get("UNMASK_HOME")
    if not home:
        home = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unmask")
    return Path(home).expanduser() / "models"


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub model id ``org/name``; a one-line error otherwise."""
    if not (REPO_ID.fullmatch(repo_id) and "--" not in repo_id and ".." not in repo_id
            and not repo_id.endswith(".git")):
        raise UnmaskError(
            f"{repo_id!r} is not a Hugging Face model id: expected ORG/NAME of letters, digits, '-', '_' and '.' "
            "(no '--' or '..'), e.g. GSAI-ML/LLaDA-8B-Instruct"
        )
    return repo_id


def check_revision(revision: str) -> str:
    """``revision`` if it looks like a branch, tag or commit; a one-line error otherwise."""
    if not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision or revision.endswith("/"):
        raise UnmaskError(f"{revision!r} is not a revision: expected a branch, tag or commit hash such as main or v1.0")
    return revision


def model_path(repo_id: str) -> Path:
    """The cache directory of a Hub model id (whether or not it has been pulled)."""
    org, name = check_repo_id(repo_id).split("/")
    return cache_dir() / f"{org}--{name}"


def cached_dir(name: str) -> Path | None:
    """The cache entry a name would be (``org/name`` -> ``org--name``, or a bare name), None if none."""
    if REPO_ID.fullmatch(name) and "--" not in name and ".." not in name:
        return cache_dir() / name.replace("/", "--")
    if re.fullmatch(REPO_PART, name) and ".." not in name:
        return cache_dir() / name
    return None


def read_record(directory: Path) -> dict[str, Any]:
    """The pull record of a cache entry; ``{}`` when there is none or it is unreadable (it only informs)."""
    try:
        return read_json_object(directory / RECORD_NAME)
    except UnmaskError:
        return {}


def write_record(directory: Path, record: dict[str, Any]) -> None:
    (directory / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing an older ``target`` only once the new one is in place."""
    if not target.exists():
        os.replace(source, target)
        return
    stale = target.with_name(target.name + STALE_SUFFIX)
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(target, stale)
    os.replace(source, target)
    shutil.rmtree(stale, ignore_errors=True)
