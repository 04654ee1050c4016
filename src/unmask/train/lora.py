"""Low-rank training (``trainable = "lora:R"``): every matrix of the blocks trains as ``W + A @ B``.

The base matrix ``W`` stays frozen; only ``A`` [out, R] and ``B`` [R, in] (and the norms) train.
What trains is then exactly what ships: a delta of rank-R factors over the base (``models.delta``),
with no truncation error from a singular value decomposition made after full fine-tuning. The
input goes through ``B`` then ``A`` (2R(in + out) multiply-adds a token beside the frozen
product), so the backward pass needs no [out, in] weight gradient and the optimizer keeps state
for the factors only; on a 2-core CPU that did not make a step of SmolLM2-135M measurably faster
(docs/training.md has the figures), so the reason to use it is what ships.

A fresh start has ``A = 0`` (the model is its base at step 0) and ``B`` random. ``init_delta``
starts from an earlier delta instead (a directory over the same base, e.g. a shipped model):
its factors seed ``A`` and ``B``, re-balanced so both carry the square root of each singular
value, and its whole tensors (norms) replace the base's.

In a state dict a low-rank layer keeps its frozen ``weight`` beside ``delta_a`` and ``delta_b``;
``models.io.fold_factors`` adds them into one weight (the final model, or a checkpoint loaded as a model).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.errors import UnmaskError
from unmask.models.transformer import Transformer


class LowRankLinear(nn.Module):
    """``x @ (W + A @ B).T + bias`` with ``W`` (and the bias) frozen, computed without forming ``A @ B``."""

    def __init__(self, linear: nn.Linear, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        out_dim, in_dim = linear.weight.shape
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        like = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        self.delta_a = nn.Parameter(torch.zeros(out_dim, rank, **like))
        b = torch.randn(rank, in_dim, generator=generator, dtype=torch.float32) / math.sqrt(in_dim)
        self.delta_b = nn.Parameter(b.to(**like))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.delta_b), self.delta_a)

    def set_factors(self, a: Tensor, b: Tensor) -> None:
        """Start from ``W + a @ b`` (any rank up to R; the rest of the factors start as a fresh layer's)."""
        rank = a.shape[1]
        if rank > self.delta_a.shape[1] or a.shape[0] != self.weight.shape[0] or b.shape != (rank, self.weight.shape[1]):
            raise ValueError(f"factors {tuple(a.shape)} x {tuple(b.shape)} do not fit a rank-{self.delta_a.shape[1]} "
                             f"layer of {tuple(self.weight.shape)}")
        a, b = balanced(a.double(), b.double())
        with torch.no_grad():
            self.delta_a[:, :rank] = a.to(self.delta_a.dtype)
            self.delta_a[:, rank:] = 0
            self.delta_b[:rank] = b.to(self.delta_b.dtype)


def balanced(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Factors with the same product ``a @ b`` whose columns/rows carry sqrt(singular value) each."""
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    root = s.sqrt()
    return qa @ (u * root), (root[:, None] * vh) @ qb.T


def low_rank_layers(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def attach(model: Transformer, rank: int, seed: int = 0) -> int:
    """Replace every linear layer of the blocks by a rank-``rank`` trainable one; freeze everything
    else but the norms. Returns the trainable parameter count."""
    generator = torch.Generator().manual_seed(seed)
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LowRankLinear(child, rank, generator))
    for name, p in model.named_parameters():
        if not name.endswith(("delta_a", "delta_b")):
            p.requires_grad_(name.endswith("norm.weight") and not name.startswith(("embed.", "head.")))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def start_from_delta(model: Transformer, directory: str | Path, base: str) -> None:
    """Seed the low-rank layers and whole tensors of an ``attach``-ed model from a delta directory
    over ``base`` (the run's ``init_from``, whose weights the model holds)."""
    from unmask.files import read_json_object
    from unmask.models.delta import BASE_NAME, DELTA_NAME, made_over
    from unmask.models.io import read_safetensors

    directory = Path(directory)
    if not (directory / BASE_NAME).is_file():
        raise UnmaskError(f"[train] init_delta {directory}: not a delta directory (no {BASE_NAME})")
    record = read_json_object(directory / BASE_NAME, missing_ok=False)
    if not made_over(record, base):
        raise UnmaskError(f"[train] init_delta {directory}: a delta over {record.get('base')!r}, not over init_from {base!r}")
    delta = read_safetensors(directory / DELTA_NAME)
    layers = low_rank_layers(model)
    params = dict(model.named_parameters())
    for key, tensor in delta.items():
        if key.endswith(".delta_b"):
            continue
        if key.endswith(".delta_a"):
            weight = key[: -len(".delta_a")]
            layer = layers.get(weight[: -len(".weight")])
            factor = delta.get(f"{weight}.delta_b")
            if layer is None or factor is None:
                raise UnmaskError(f"[train] init_delta {directory}: factors of {weight} have no low-rank layer to seed")
            try:
                layer.set_factors(tensor.float(), factor.float())
            except ValueError as exc:
                raise UnmaskError(f"[train] init_delta {directory}: {weight}: {exc}") from None
        elif key in params and params[key].shape == tensor.shape:  # a norm, or a whole changed (frozen) matrix
            with torch.no_grad():
                params[key].copy_(tensor.float())
        else:
            raise UnmaskError(f"[train] init_delta {directory}: tensor {key} is not in the model")
