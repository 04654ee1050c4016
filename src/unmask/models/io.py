"""Saving and loading unmask's native model directories (``config.json`` + safetensors).

Only safetensors are ever read: nothing is unpickled and no code from a model directory runs.
Every problem with a directory is reported as an ``UnmaskError`` naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.files import check_regular
from unmask.models.hf.weights import INDEX_NAME, check, read_headers, weight_files
from unmask.models.transformer import Transformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def cast_state(state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors a model directory stores: tied head dropped, floats cast to ``dtype``, contiguous on the CPU."""
    out = {}
    for name, tensor in state.items():
        if name == "head.weight" and config.tie_embeddings:
            continue
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[name] = tensor.contiguous().cpu()
    return out


def state_for_saving(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return cast_state(model.state_dict(), model.config, dtype)


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


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped, in order, into files of at most ``max_bytes`` (a larger tensor gets a file of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None = None) -> list[Path]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` when the
    tensors exceed ``max_shard_bytes`` (the Hugging Face layout, so other tools read it too)."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        atomic_save_file(tensors, directory / WEIGHTS_NAME)
        return [directory / WEIGHTS_NAME]
    groups = plan_shards(tensors, max_shard_bytes)
    paths, weight_map = [], {}
    for i, names in enumerate(groups, start=1):
        path = directory / shard_name(i, len(groups))
        atomic_save_file({n: tensors[n] for n in names}, path)
        weight_map.update({n: path.name for n in names})
        paths.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def save_model(
    model: Transformer, directory: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int | None = None
) -> Path:
    """Write ``config.json`` and the weights (optionally cast, e.g. to bfloat16; sharded past ``max_shard_bytes``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / CONFIG_NAME)
    write_weights(state_for_saving(model, dtype), directory, max_shard_bytes)
    return directory


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a model directory (one file or the index's shards) and a name for error messages."""
    files = weight_files(directory)
    if isinstance(files, list):
        return read_safetensors(files[0]), str(files[0])
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        part = read_safetensors(path)
        stray = sorted(n for n in part if files.get(n) != path)
        if stray:
            raise UnmaskError(f"{path}: holds {stray[0]}, which {INDEX_NAME} does not place there")
        absent = sorted(n for n, f in files.items() if f == path and n not in part)
        if absent:
            raise UnmaskError(f"{path}: has no tensor {absent[0]}, which {INDEX_NAME} places there")
        state.update(part)
    return state, str(directory / INDEX_NAME)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file, memory-mapped; a damaged file is a one-line error."""
    if not path.exists():
        raise UnmaskError(f"{path}: weights file not found")
    check_regular(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UnmaskError(f"{path}: not a readable safetensors file ({exc})") from None


FACTOR_SUFFIXES = (".delta_a", ".delta_b")


def fold_factors(state: dict[str, torch.Tensor], source: str = "state") -> dict[str, torch.Tensor]:
    """``state`` with each pair ``X.delta_a`` [out, r], ``X.delta_b`` [r, in] added into its weight
    (``X`` itself, or ``X.weight`` when ``X`` names a layer): ``W + A @ B``, in W's dtype."""
    folded = {k: v for k, v in state.items() if not k.endswith(FACTOR_SUFFIXES)}
    for key in state:
        if key.endswith(".delta_b") and key[: -len(".delta_b")] + ".delta_a" not in state:
            raise UnmaskError(f"{source}: {key} has no {key[: -len('.delta_b')]}.delta_a")
    for key, a in state.items():
        if not key.endswith(".delta_a"):
            continue
        stem = key[: -len(".delta_a")]
        target = stem if stem in folded else f"{stem}.weight"
        b, w = state.get(f"{stem}.delta_b"), folded.get(target)
        if b is None or w is None or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] \
                or (a.shape[0], b.shape[1]) != tuple(w.shape):
            raise UnmaskError(f"{source}: low-rank factors {key} do not fit a weight of the model")
        folded[target] = (w.float() + a.float() @ b.float()).to(w.dtype)
    return folded


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
    """Build the model described by ``config.json`` and fill it from its safetensors (one file or shards)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UnmaskError(f"{directory}: model directory not found")
    config = ModelConfig.load(directory / CONFIG_NAME)  # types and sane bounds checked
    with torch.device("meta"):
        model = Transformer(config)
    # Every tensor's name, shape and dtype from the file headers against the config, before a
    # weight is read or the model allocated: a config that lies about a size fails here, on one line.
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_embeddings:
        expected.pop("head.weight", None)
    headers = read_headers(weight_files(directory))
    # a low-rank training checkpoint (unmask.train.lora) keeps factors beside each frozen weight
    check(headers, expected, {name for name in headers if name.endswith(FACTOR_SUFFIXES)}, directory)
    state, source = read_weights(directory)
    state = fold_factors(state, source)
    if dtype is None:
        dtype = next(iter(state.values())).dtype if state else torch.float32
    return filled(model, state, source, device, dtype)


def filled(
    model: Transformer, state: dict[str, torch.Tensor], source: str, device: torch.device | str, dtype: torch.dtype
) -> Transformer:
    """A model built on the meta device, allocated on ``device`` in ``dtype`` and filled from ``state`` (checked)."""
    model = model.to_empty(device=device).to(dtype)
    load_state(model, state, source)
    if model.config.tie_embeddings:
        model.head.weight = model.embed.weight
    return model.eval()
