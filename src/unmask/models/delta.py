"""A model stored as the tensors it changed over a base model it was adapted from.

An adapted model whose training left most of its base untouched (frozen layers, embeddings)
ships as a directory holding ``config.json`` (the whole model's config), ``base.json`` (which
base, and the SHA-256 of its file so a different one is never used silently), the changed
tensors in ``delta.safetensors``, and the tokenizer files. Loading reads the base (e.g. a GGUF
file that an installed package ships), replaces the changed tensors and checks that every
tensor of the config is accounted for.

A changed matrix may be stored as a rank-r factorisation of its change, ``W = W_base + A @ B``
(``NAME.delta_a`` [out, r] and ``NAME.delta_b`` [r, in], from a truncated SVD): fine-tuning
changes are close to low-rank, and this is what keeps a model whose every block trained small.
``base.json`` records each matrix's relative truncation error ||dW - AB|| / ||dW||.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from unmask.errors import UnmaskError
from unmask.files import read_json_object
from unmask.models.config import ModelConfig
from unmask.models.io import CONFIG_NAME, FACTOR_SUFFIXES, atomic_save_file, cast_state, filled, fold_factors, read_safetensors
from unmask.models.transformer import Transformer

BASE_NAME = "base.json"
DELTA_NAME = "delta.safetensors"


def is_delta_dir(directory: Path) -> bool:
    return (directory / BASE_NAME).is_file()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def made_over(record: dict[str, Any], name: str) -> bool:
    """Whether the delta of ``base.json`` ``record`` was made over the model ``name``: the SHA-256 of
    the file it resolves to, or (a directory) the recorded name."""
    from unmask.hub import resolve_model

    path = resolve_model(name)
    return record.get("sha256") == file_sha256(path) if path.is_file() else record.get("base") == name


def changed_tensors(model: Transformer, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` that differ from ``base`` (tied head left out)."""
    state = cast_state(model.state_dict(), model.config)
    return {k: v for k, v in state.items() if k not in base or not torch.equal(v, base[k].to(v.dtype))}


def low_rank(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A [out, r], B [r, in] with A @ B the best rank-``rank`` approximation of ``change``, and its relative error."""
    u, s, vh = torch.linalg.svd(change.double(), full_matrices=False)
    a, b = (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
    error = float(torch.linalg.norm(change.double() - a.double() @ b.double()) / torch.linalg.norm(change.double()).clamp(min=1e-30))
    return a, b, error


def save_delta(
    model: Transformer, base_name: str, base_path: Path, base_state: dict[str, torch.Tensor], directory: Path,
    dtype: torch.dtype | None = torch.bfloat16, rank: int | None = None,
) -> dict[str, Any]:
    """Write ``model`` as a delta over the base (changed matrices as rank-``rank`` factors when that is
    smaller); returns the ``base.json`` record."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = changed_tensors(model, base_state)
    delta, errors = {}, {}
    for name, tensor in changed.items():
        out_dim, in_dim = tensor.shape if tensor.dim() == 2 else (0, 0)
        if rank is not None and tensor.dim() == 2 and name in base_state and rank * (out_dim + in_dim) < out_dim * in_dim:
            a, b, errors[name] = low_rank(tensor.float() - base_state[name].float(), rank)
            delta[f"{name}.delta_a"], delta[f"{name}.delta_b"] = a, b
        else:
            delta[name] = tensor
    if dtype is not None:  # matrices' factors in ``dtype``; vectors (norms) stay float32, they are tiny
        delta = {k: v.to(dtype) if v.is_floating_point() and v.dim() > 1 else v.float() for k, v in delta.items()}
    model.config.save(directory / CONFIG_NAME)
    atomic_save_file({k: v.contiguous() for k, v in delta.items()}, directory / DELTA_NAME)
    record = {"base": base_name, "file": base_path.name, "sha256": file_sha256(base_path), "rank": rank,
              "changed": sorted(changed), "unchanged": len(base_state) - len(changed),
              "truncation_error": {k: round(v, 5) for k, v in sorted(errors.items())}}
    (directory / BASE_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_delta(directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """The base named in ``base.json`` with the delta's tensors in place of its own."""
    from unmask.hub import resolve_model
    from unmask.loading import load

    record = read_json_object(directory / BASE_NAME, missing_ok=False)
    name, sha = record.get("base"), record.get("sha256")
    if not isinstance(name, str) or not isinstance(sha, str):
        raise UnmaskError(f"{directory / BASE_NAME}: needs the strings 'base' and 'sha256'")
    if not made_over(record, name):
        raise UnmaskError(f"{directory}: its base {name} ({resolve_model(name)}) is not the file it was trained from (SHA-256 differs)")
    config = ModelConfig.load(directory / CONFIG_NAME)
    base = load(name, device="cpu", dtype=torch.float32).model
    state = {k: v for k, v in base.state_dict().items() if not (config.tie_embeddings and k == "head.weight")}
    delta = read_safetensors(directory / DELTA_NAME)
    for key in delta:
        if not key.endswith(FACTOR_SUFFIXES) and key not in state:
            raise UnmaskError(f"{directory / DELTA_NAME}: tensor {key} is not in the base model")
    state = fold_factors({**state, **{k: v.float() for k, v in delta.items()}}, str(directory / DELTA_NAME))
    with torch.device("meta"):
        model = Transformer(config)
    return filled(model, state, str(directory / DELTA_NAME), device, dtype or torch.float32)
