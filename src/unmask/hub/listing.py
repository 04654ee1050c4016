"""``unmask list``: facts about the shipped, packaged and cached models, read without loading them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError
from unmask.files import read_json_object
from unmask.hub.cache import PARTIAL_SUFFIX, STALE_SUFFIX, cache_dir, read_record
from unmask.hub.names import PACKAGED, SHIPPED_NAMES, packaged_path


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
    record = read_record(path)
    entry = ModelEntry(
        name=name, path=str(path), family="?", attention="?", parameters=None, size_bytes=_dir_size(path),
        status="ok", revision=record.get("revision"), commit=record.get("commit"),
    )
    try:
        config = read_json_object(path / "config.json", missing_ok=False)
        entry.family, entry.attention = _family(path, config)
        entry.parameters = _delta_parameters(path) if (path / "base.json").is_file() else count_parameters(path)
        if (path / "base.json").is_file():
            entry.family = f"unmask, delta over {read_json_object(path / 'base.json').get('base', '?')}"
    except UnmaskError as exc:
        entry.status = str(exc)
    return entry


def _delta_parameters(path: Path) -> int:
    """A delta directory's whole model (its config's shape), not the factors it stores."""
    import torch

    from unmask.models.config import ModelConfig
    from unmask.models.transformer import Transformer

    with torch.device("meta"):
        return Transformer(ModelConfig.load(path / "config.json")).num_params()


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
    """The shipped models, the packaged ones installed, then every model in the cache (incomplete downloads flagged)."""
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
        name = read_record(path).get("repo_id") or stem.replace("--", "/", 1)
        entry = describe(path, name)
        if partial:
            entry.status = "incomplete download"
        entries.append(entry)
    return entries


def entries_json(entries: Iterable[ModelEntry]) -> str:
    return json.dumps([asdict(e) for e in entries], indent=2)


def count_parameters(path: Path) -> int:
    """Total elements of every tensor in the directory's safetensors files (headers only)."""
    from unmask.models.hf.weights import read_headers

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnmaskError("no safetensors weights")
    return sum(math.prod(info.shape) for info in read_headers(files).values())


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
