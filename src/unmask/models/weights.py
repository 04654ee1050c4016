"""Opt-in float16 weights for decoding on a CPU: half the bytes that every token has to read.

At batch 1 an AR decode step reads every weight once, so on a CPU it costs about
``weight bytes / memory bandwidth``; float32 (the exact dequantisation of a GGUF file, and the
default) reads 4 bytes a weight. ``half_linears`` stores the weights of every linear layer (the
tied output head included) in float16. One-row inputs (decode steps) then run torch's float16
matrix-vector kernel, which widens to float32 inside and reads 2 bytes a weight; longer inputs
(prefill) widen the weight to float32 first, because the float16 matrix-matrix kernel is slow on
CPUs without float16 arithmetic. Embeddings, norms, attention and the KV cache stay float32.

Not the default: logits move (SmolLM2-135M: by a few hundredths; see docs/benchmarks.md), and an
activation beyond float16's range (65504) at a linear layer's input or output would overflow.
bfloat16 and int8 weights were measured too and were no faster on this path (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.errors import UnmaskError

WEIGHT_FORMATS = ("f32", "f16")  # f32: the exact default; f16: half_linears
MATVEC_ROWS = 4  # inputs with at most this many rows use the float16 kernel; longer ones widen the weight


class HalfLinear(nn.Module):
    """A linear layer whose weight [out, in] is kept in float16 (a buffer, so ``model.dtype`` and the
    KV cache stay float32); the bias, if any, stays in the input's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.float16).clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // max(x.shape[-1], 1) > MATVEC_ROWS:
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        out = F.linear(x.to(torch.float16), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float16"


def half_linears(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) with a ``HalfLinear``; returns the model.

    A head tied to the embedding gets its own float16 copy; the float32 embedding is kept for the
    lookups. Use it for inference only (the float16 weights are not trained).
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, HalfLinear(child))
    return model


def with_weights(model: nn.Module, weights: str) -> nn.Module:
    """``model`` with its linear weights in ``weights`` format (one of ``WEIGHT_FORMATS``)."""
    if weights not in WEIGHT_FORMATS:
        raise UnmaskError(f"unknown weight format {weights!r} (choose from {', '.join(WEIGHT_FORMATS)})")
    return model if weights == "f32" else half_linears(model)
