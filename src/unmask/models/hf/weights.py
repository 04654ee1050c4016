"""Safetensors weights of a published checkpoint: find them, check them, stream them onto the model.

- ``model.safetensors``, or shards listed by ``model.safetensors.index.json``. Pickle formats
  (``.bin``, ``.pt``, ``.pth``) are refused with the command that converts them; nothing is unpickled.
- Every file's header, every tensor's name, dtype and shape are checked against the config before
  a single weight is read, so a bad checkpoint fails with one line and never half-loads.
- Weights are copied one tensor at a time from a memory map that is closed again at once (large
  tensors in slices of rows), so host memory holds the model plus at most one slice: a shard's
  pages never stay mapped while the next tensor is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from unmask.errors import UnmaskError
from unmask.files import check_regular, read_json

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SLICE_BYTES = 64 * 2**20  # largest piece of one tensor read through a mapping at a time
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@dataclass(frozen=True)
class TensorInfo:
    file: Path  # the safetensors file holding the tensor
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]  # stored shape


def weight_files(directory: Path) -> dict[str, Path] | list[Path]:
    """The index's ``{tensor: file}`` map for a sharded checkpoint, else ``[model.safetensors]``."""
    index = directory / INDEX_NAME
    if index.exists():
        return _read_index(index)
    single = directory / SINGLE_NAME
    if single.exists():
        return [single]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        pattern = "*" + Path(pickles[0]).suffix
        raise UnmaskError(
            f"{directory / pickles[0]}: only pickle weights found ({', '.join(pickles[:3])}); unmask reads safetensors "
            "only and never unpickles. Convert once, in this directory and only if you trust the files: python -c "
            "\"import glob, torch; from safetensors.torch import save_file; sd = {}; "
            f"[sd.update(torch.load(f, weights_only=True)) for f in sorted(glob.glob('{pattern}'))]; "
            "save_file({k: v.clone().contiguous() for k, v in sd.items()}, 'model.safetensors')\""
        )
    raise UnmaskError(f"{directory}: no weights ({SINGLE_NAME} or {INDEX_NAME})")


def _read_index(index: Path) -> dict[str, Path]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnmaskError(f"{index}: no 'weight_map' object")
    files: dict[str, Path] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise UnmaskError(f"{index}: tensor {name} points to {file!r}, not a .safetensors file beside the index")
        path = index.parent / file
        if not path.exists():
            raise UnmaskError(f"{path}: shard listed in {INDEX_NAME} is missing")
        files[name] = path
    return files


def read_headers(source: dict[str, Path] | list[Path]) -> dict[str, TensorInfo]:
    """Name, dtype and shape of every tensor, from the file headers only (no weights are read)."""
    files = sorted(set(source.values())) if isinstance(source, dict) else source
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                piece = f.get_slice(name)
                tensors[name] = TensorInfo(path, piece.get_dtype(), tuple(piece.get_shape()))
    if isinstance(source, dict):
        for name, path in source.items():
            found = tensors.get(name)
            if found is None or found.file != path:
                raise UnmaskError(f"{path}: has no tensor {name}, which {INDEX_NAME} places there")
    return tensors


def check(tensors: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], ignored: set[str], directory: Path) -> None:
    """Every expected checkpoint tensor present with the right shape and a float dtype; nothing unknown."""
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise UnmaskError(f"{_where(tensors, directory)}: missing tensor {name}")
        if info.dtype not in FLOAT_DTYPES:
            raise UnmaskError(f"{info.file}: tensor {name} has dtype {info.dtype}; unmask loads float16/bfloat16/float32 weights")
        if info.shape != shape:
            raise UnmaskError(f"{info.file}: tensor {name} has shape {info.shape}, config.json implies {shape}")
    unknown = sorted(set(tensors) - set(expected) - ignored)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise UnmaskError(
            f"{tensors[unknown[0]].file}: unexpected tensors {unknown[:3]}{more} (does config.json match the weights?)"
        )


def _where(tensors: dict[str, TensorInfo], directory: Path) -> Path:
    files = {info.file for info in tensors.values()}
    if len(files) == 1:
        return next(iter(files))
    return directory / INDEX_NAME if (directory / INDEX_NAME).is_file() else directory


def copy_into(target: torch.Tensor, name: str, info: TensorInfo) -> None:
    """Fill ``target`` (any device, any float dtype) with one stored tensor, a slice of rows at a time."""
    row_bytes = 4 * math.prod(info.shape[1:])
    step = max(1, SLICE_BYTES // max(1, row_bytes))
    with torch.no_grad():
        if not info.shape or info.shape[0] <= step:
            with _open(info.file) as f:
                target.copy_(f.get_tensor(name))
            return
        for start in range(0, info.shape[0], step):
            with _open(info.file) as f:  # reopened per slice, so the mapped pages are released each time
                target[start : start + step].copy_(f.get_slice(name)[start : start + step])


@contextmanager
def _open(path: Path) -> Iterator:
    check_regular(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as exc:
        raise UnmaskError(f"{path}: not a readable safetensors file ({exc})") from None
