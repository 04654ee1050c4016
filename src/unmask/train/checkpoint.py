"""Training checkpoints: model, optimizer and trainer state, written atomically, safetensors only.

Layout of ``out_dir/checkpoints/``::

    step-00000100/  config.json  model.safetensors  optimizer.safetensors  trainer_state.json
    latest          (one line: the name of the newest complete checkpoint)

A checkpoint is written into a temporary directory and renamed into place, and ``latest`` is
replaced atomically afterwards, so a crash at any moment leaves the previous checkpoint usable.
The optimizer state is flattened into tensors plus a JSON of everything else: nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from unmask.errors import UnmaskError
from unmask.models.io import atomic_save_file, load_model, save_model
from unmask.models.transformer import Transformer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = []
    for group in state["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten_optimizer_state``: a dict ``optimizer.load_state_dict`` accepts."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for group in meta["param_groups"]:
        groups.append({k: (tuple(v) if k == "betas" else v) for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    atomic_save_file(tensors, path, metadata={"optimizer": json.dumps(meta)})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore an optimizer written by ``save_optimizer``; a mismatch is an ``UnmaskError``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["optimizer"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise UnmaskError(f"{path}: not a readable optimizer state ({exc})") from None
    try:
        optimizer.load_state_dict(unflatten_optimizer_state(tensors, meta))
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UnmaskError(f"{path}: optimizer state does not fit this model ({exc})") from None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    out_dir: str | Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int
) -> Path:
    """Write ``checkpoints/step-NNNNNNNN/``, point ``latest`` at it and keep only the newest ``keep``."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    save_optimizer(optimizer, tmp / OPTIMIZER_NAME)
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_NAME).is_file())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none."""
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / STATE_NAME).is_file():
        raise UnmaskError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: str | Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Fill ``model`` and ``optimizer`` from a checkpoint directory; returns its trainer state."""
    path = Path(path)
    saved = load_model(path, device="cpu", dtype=torch.float32)
    if saved.config.to_dict() != model.config.to_dict():
        raise UnmaskError(f"{path}: checkpoint model config differs from the training config")
    target = model.state_dict()
    with torch.no_grad():
        for name, tensor in saved.state_dict().items():
            target[name].copy_(tensor)
    load_optimizer(optimizer, path / OPTIMIZER_NAME)
    try:
        return json.loads((path / STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise UnmaskError(f"{path / STATE_NAME}: unreadable trainer state ({exc})") from None
