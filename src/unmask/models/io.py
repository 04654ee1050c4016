"""Saving and loading unmask's native model directories (``config.json`` + safetensors).

Only safetensors are ever read: nothing is unpickled and no code from a model directory runs.
Every problem with a directory is reported as an ``UnmaskError`` naming the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def state_for_saving(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("head.weight", None)
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous().cpu()
    return out


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file via a temporary file and a rename, so readers never see half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: Transformer, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (optionally cast, e.g. to bfloat16)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_NAME)
    atomic_save_file(state_for_saving(model, dtype), directory / WEIGHTS_NAME)
    return directory


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file, memory-mapped; a damaged file is a one-line error."""
    if not path.is_file():
        raise UnmaskError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UnmaskError(f"{path}: not a readable safetensors file ({exc})") from None


def load_state(model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes, so a failure leaves no half-loaded model."""
    expected = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise UnmaskError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise UnmaskError(f"{source}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UnmaskError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)


def load_model(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Build the model described by ``config.json`` and fill it from ``model.safetensors``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UnmaskError(f"{directory}: model directory not found")
    config = ModelConfig.load(directory / CONFIG_NAME)
    state = read_safetensors(directory / WEIGHTS_NAME)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    if dtype is None:
        dtype = next(iter(state.values())).dtype if state else torch.float32
    model = model.to(dtype)
    load_state(model, state, str(directory / WEIGHTS_NAME))
    if config.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()
