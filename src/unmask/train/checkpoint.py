"""Training checkpoints: model, optimizer and trainer state, written atomically, safetensors only.

Layout of ``out_dir/checkpoints/``::

    step-00000100/  config.json  model.safetensors  optimizer.safetensors  trainer_state.json  complete.json
    latest          (one line: the name of the newest complete checkpoint)

A checkpoint is written into a temporary directory and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint usable.
``complete.json`` is written last and lists every file with its size: a checkpoint is complete
only when each listed file is there at that size, so a directory a kill left half-written or
half-deleted is never resumed from. Old checkpoints are pruned by renaming them out of the
``step-*`` names first, then deleting them.

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict`` with
``full_state_dict=True``: a plain, DDP or FSDP2-sharded model all give the same full tensors,
keyed by parameter name, so a checkpoint written by one process resumes under ``torchrun``
with any number of processes and the other way round. The optimizer state is flattened into
tensors named ``state/<parameter>/<key>`` plus a JSON of everything else: nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from unmask.errors import UnmaskError
from unmask.files import read_json_object
from unmask.models.config import ModelConfig
from unmask.models.io import CONFIG_NAME, FACTOR_SUFFIXES, atomic_save_file, cast_state, load_model, read_weights, write_weights

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
OPTIMIZER_FORMAT = "fqn-v1"
MARKER_NAME = "complete.json"
_PRUNING = ".prune-"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place, so its model is its own inner module)."""
    return getattr(model, "module", model)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full model and optimizer state dicts on the CPU of rank 0 (empty elsewhere).

    A collective under FSDP2: every process must call it.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = _inner(model)
    return get_model_state_dict(inner, options=options), get_optimizer_state_dict(inner, optimizer, options=options)


def gather_model_state(model: torch.nn.Module) -> dict[str, Any]:
    """The full model state dict on the CPU of rank 0 (empty elsewhere); a collective under FSDP2."""
    return get_model_state_dict(_inner(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _load_optimizer_by_name(module: torch.nn.Module, optimizer: torch.optim.Optimizer, optim_state: dict[str, Any]) -> None:
    """Name-keyed optimizer state into an optimizer over ordinary (unsharded) parameters."""
    names = {id(p): name for name, p in module.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {index[name]: entry for name, entry in optim_state["state"].items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in optim_state["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict[str, Any], optim_state: dict[str, Any] | None
) -> None:
    """Load full state dicts (every process holds them) into a plain, DDP or FSDP2 model and its optimizer."""
    inner = _inner(model)
    state = dict(model_state)
    if inner.config.tie_embeddings and "head.weight" not in state and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]
    sharded = _is_sharded(inner)
    if sharded:
        set_model_state_dict(inner, state, options=StateDictOptions(full_state_dict=True))
    else:
        inner.load_state_dict(state)
    if optimizer is None or optim_state is None:
        return
    if sharded:
        set_optimizer_state_dict(inner, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
    else:
        _load_optimizer_by_name(inner, optimizer, optim_state)


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a name-keyed optimizer state dict into named tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(param, {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"format": OPTIMIZER_FORMAT, "param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten_optimizer_state``."""
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, param, name = key.split("/", 2)
        state.setdefault(param, {})[name] = tensor
    for param, entry in meta.get("scalars", {}).items():
        state.setdefault(param, {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def read_optimizer_state(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["optimizer"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise UnmaskError(f"{path}: not a readable optimizer state ({exc})") from None
    if meta.get("format") != OPTIMIZER_FORMAT:
        raise UnmaskError(f"{path}: optimizer state in an older layout; start over with a fresh out_dir or --fresh")
    return unflatten_optimizer_state(tensors, meta)


def save_weights(
    directory: Path, config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """``config.json`` + the safetensors weights from a full state dict (the layout ``models.io`` reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save(directory / CONFIG_NAME)
    write_weights(cast_state(state, config, dtype), directory, max_shard_bytes)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint(
    out_dir: str | Path, step: int, config: ModelConfig, model_state: dict[str, Any], optim_state: dict[str, Any],
    state: dict[str, Any], keep: int,
) -> Path:
    """Write ``checkpoints/step-NNNNNNNN/`` from full state dicts, point ``latest`` at it, keep the newest ``keep``."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(tmp, config, model_state)
    tensors, meta = flatten_optimizer_state(optim_state)
    atomic_save_file(tensors, tmp / OPTIMIZER_NAME, metadata={"optimizer": json.dumps(meta)})
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    _write_text_atomic(tmp / MARKER_NAME, json.dumps({"files": files}, indent=2) + "\n")  # last: completes it
    if final.exists():
        _prune(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
    for old in list_checkpoints(out_dir)[:-keep]:
        _prune(old)
    for stale in root.glob(f"{_PRUNING}*"):  # left by a kill during an earlier prune
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _prune(path: Path) -> None:
    """Take a checkpoint out of the ``step-*`` names at once (atomic), then delete it."""
    doomed = path.with_name(f"{_PRUNING}{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def is_complete(path: Path) -> bool:
    """Every file ``complete.json`` lists is there, at its size (checkpoints written before the
    marker existed: config, weights, optimizer and trainer state all present and non-empty)."""
    marker = path / MARKER_NAME
    try:
        if marker.is_file():
            files = read_json_object(marker).get("files")
            return isinstance(files, dict) and bool(files) and all(
                isinstance(size, int) and (path / name).is_file() and (path / name).stat().st_size == size
                for name, size in files.items())
        weights = path / "model.safetensors"
        index = path / "model.safetensors.index.json"
        needed = [path / CONFIG_NAME, path / OPTIMIZER_NAME, path / STATE_NAME]
        if index.is_file():
            shards = set(read_json_object(index).get("weight_map", {}).values())
            needed += [index, *(path / str(s) for s in shards)]
        else:
            needed.append(weights)
        return all(p.is_file() and p.stat().st_size > 0 for p in needed)
    except (OSError, ValueError, AttributeError, UnmaskError):
        return False


def save_checkpoint(
    out_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    keep: int, is_main: bool = True,
) -> Path:
    """Gather the full state (a collective under FSDP2) and let the main process write it."""
    model_state, optim_state = gather_state(model, optimizer)
    final = Path(out_dir) / CHECKPOINTS / step_name(step)
    if is_main:
        write_checkpoint(out_dir, step, _inner(model).config, model_state, optim_state, state, keep)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_complete(p))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none."""
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not is_complete(path):
        complete = list_checkpoints(out_dir)
        if complete:  # a kill between writing a checkpoint and pointing at it, or a damaged one
            return complete[-1]
        raise UnmaskError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Fill ``model`` (plain, DDP or FSDP2) and ``optimizer`` from a checkpoint directory; returns its trainer state."""
    path = Path(path)
    saved = load_model(path, device="cpu", dtype=torch.float32)
    if saved.config.to_dict() != _inner(model).config.to_dict():
        raise UnmaskError(f"{path}: checkpoint model config differs from the training config")
    optim_state = read_optimizer_state(path / OPTIMIZER_NAME)
    state = saved.state_dict()
    if any(name.endswith(FACTOR_SUFFIXES) for name in _inner(model).state_dict()):
        # low-rank training (unmask.train.lora): the frozen weights and their factors, unfolded
        state = {k: v.float() for k, v in read_weights(path)[0].items()}
    try:
        restore_state(model, optimizer, state, optim_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UnmaskError(f"{path}: checkpoint does not fit this model and optimizer ({exc})") from None
    return read_json_object(path / STATE_NAME, missing_ok=False)
