"""``unmask pull``: the safe files of a Hugging Face Hub model, downloaded into the cache.

Only data files are fetched (JSON, safetensors, Jinja templates, tokenizer vocabularies,
markdown), never pickled weights or Python code; a repository without safetensors weights is
refused. With no network a pull fails within its timeout with one line saying so. A pull
downloads into ``<org>--<name>.partial/`` (run it again to resume) and renames it when complete.
"""

from __future__ import annotations

import fnmatch
import glob
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError
from unmask.hub.cache import (
    PARTIAL_SUFFIX,
    cache_dir,
    check_repo_id,
    check_revision,
    model_path,
    read_record,
    replace_dir,
    write_record,
)
from unmask.hub.display import human_size

DEFAULT_TIMEOUT = 5.0  # seconds to wait for the Hub before giving up

# Fetched: top-level files matching these. Everything a loader reads is among them.
SAFE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.md", "tokenizer.model", "merges.txt", "vocab.txt")
# Never fetched, whatever the patterns above say: pickles and code.
REFUSED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.py", "*.pyc", "*.so")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")


def pull(
    repo_id: str,
    revision: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> Path:
    """Download the safe files of a Hub model into the cache; returns its directory.

    Asks the Hub about the repository first (bounded by ``timeout``), so no network means a
    quick, clear failure rather than a hang or a half-written cache entry.
    """
    check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)
    info = _repo_info(repo_id, revision, timeout)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    files = safe_files(sizes)
    if not any(f.endswith(".safetensors") for f in files):
        pickled = [f for f in sizes if any(fnmatch.fnmatchcase(f, p) for p in PICKLED_WEIGHTS)]
        found = f" (it has {', '.join(pickled[:3])})" if pickled else ""
        raise UnmaskError(
            f"{repo_id} has no safetensors weights{found}; unmask never loads pickled weights: convert them to "
            "safetensors with a tool you trust and pass the directory with --model DIR"
        )
    target = model_path(repo_id)
    if read_record(target).get("commit") == info.sha and _missing(target, files, sizes) == []:
        log(f"{repo_id} is up to date ({info.sha[:12]})")
        return target
    total = sum(sizes[f] or 0 for f in files)
    log(f"pulling {repo_id} at {info.sha[:12]}: {len(files)} files, {human_size(total)}")
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    if read_record(partial).get("commit") not in (None, info.sha):
        shutil.rmtree(partial)  # an unfinished download of another commit: start over
    partial.mkdir(parents=True, exist_ok=True)
    record = {"repo_id": repo_id, "revision": revision or "main", "commit": info.sha, "files": files}
    write_record(partial, record)
    _download(repo_id, info.sha, partial, files, timeout)
    missing = _missing(partial, files, sizes)
    if missing:
        raise UnmaskError(
            f"download of {repo_id} is incomplete ({missing[0]} is missing or short); "
            f"run `unmask pull {repo_id}` again to resume"
        )
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # the Hub client's resume bookkeeping
    write_record(partial, {**record, "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    replace_dir(partial, target)
    return target


def safe_files(names: Iterable[str]) -> list[str]:
    """The top-level files of a repository that a pull fetches, sorted."""
    return sorted(
        n for n in names
        if "/" not in n
        and any(fnmatch.fnmatchcase(n, p) for p in SAFE_PATTERNS)
        and not any(fnmatch.fnmatchcase(n, p) for p in REFUSED_PATTERNS)
    )


def _repo_info(repo_id: str, revision: str | None, timeout: float) -> Any:
    """The Hub's description of the repository, with every failure turned into one line."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_hint = (
        f"to use a model you already have, pass its directory (--model DIR) or copy it to {cache_dir()}/ORG--NAME"
    )
    if constants.HF_HUB_OFFLINE:
        raise UnmaskError(f"cannot pull {repo_id}: HF_HUB_OFFLINE is set; {local_hint}")
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["info"] = HfApi().model_info(repo_id, revision=revision, files_metadata=True, timeout=timeout)
        except Exception as exc:  # reported below; this thread must not die silently
            answer["error"] = exc

    # A thread bounds the whole exchange (name resolution included, which no socket timeout covers).
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(timeout + 1.0)
    unreachable = f"cannot reach the Hugging Face Hub at {constants.ENDPOINT}"
    if asker.is_alive():
        raise UnmaskError(f"{unreachable} (no answer within {timeout:g} s); {local_hint}")
    error = answer.get("error")
    if error is None:
        return answer["info"]
    if isinstance(error, RevisionNotFoundError):
        raise UnmaskError(f"{repo_id} has no revision {revision!r} on the Hub")
    if isinstance(error, GatedRepoError):
        raise UnmaskError(f"{repo_id} is gated: accept its terms on the Hub, then set HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        raise UnmaskError(f"{repo_id}: no such model on the Hub (or it is private: set HF_TOKEN)")
    if isinstance(error, OfflineModeIsEnabled):
        raise UnmaskError(f"cannot pull {repo_id}: HF_HUB_OFFLINE is set; {local_hint}")
    if isinstance(error, HfHubHTTPError):
        raise UnmaskError(f"the Hub refused to describe {repo_id}: {_first_line(error)}")
    raise UnmaskError(f"{unreachable} ({_first_line(error)}); {local_hint}")


def _download(repo_id: str, commit: str, directory: Path, files: list[str], timeout: float) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id,
            revision=commit,
            local_dir=directory,
            allow_patterns=[glob.escape(f) for f in files],
            ignore_patterns=list(REFUSED_PATTERNS),
            etag_timeout=timeout,
        )
    except Exception as exc:  # network and server failures of every kind: one line, resumable
        raise UnmaskError(
            f"download of {repo_id} stopped ({_first_line(exc)}); run `unmask pull {repo_id}` again to resume"
        ) from None


def _missing(directory: Path, files: list[str], sizes: dict[str, int | None]) -> list[str]:
    """Files absent from ``directory`` or shorter/longer than the Hub says."""
    out = []
    for f in files:
        path = directory / f
        if not path.is_file() or (sizes.get(f) is not None and path.stat().st_size != sizes[f]):
            out.append(f)
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
