"""GGUF architectures unmask reads and writes, and the tensor names they share.

| ``general.architecture`` | attention | logits | Q/K rows | extra tensors |
|---|---|---|---|---|
| ``llama`` | causal | shifted (AR) | permuted by llama.cpp's converter | |
| ``qwen2`` | causal | shifted (AR) | as in the checkpoint | q/k/v biases |
| ``qwen3`` | causal | shifted (AR) | as in the checkpoint | per-head q/k RMSNorm |
| ``dream`` | bidirectional | shifted (``diffusion.shift_logits``) | as in the checkpoint | q/k/v biases (optional) |
| ``llada`` | bidirectional | not shifted | permuted | |

llama.cpp's converter reorders the rows of each Q and K head of ``llama`` and ``llada`` models
from the rotate-half layout (first half, second half) to interleaved pairs, the layout its rope
kernel expects; ``unpermute`` undoes it on reading and ``permute`` redoes it on writing.
GGUF stores dimensions innermost first; the reader hands out arrays in PyTorch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unmask.models.config import AttentionMode, ModelConfig


@dataclass(frozen=True)
class Arch:
    name: str
    attention: str  # the attention mode unmask runs it with (unless the file's own keys say otherwise)
    shifted: bool  # default for ``diffusion.shift_logits`` / AR
    permuted_qk: bool  # llama.cpp's converter permuted the Q/K rows
    qkv_bias: bool | None  # None: present when the file has the tensors
    qk_norm: bool


ARCHS = {
    a.name: a
    for a in (
        Arch("llama", AttentionMode.CAUSAL, True, True, False, False),
        Arch("qwen2", AttentionMode.CAUSAL, True, False, True, False),
        Arch("qwen3", AttentionMode.CAUSAL, True, False, False, True),
        Arch("dream", AttentionMode.BIDIRECTIONAL, True, False, None, False),
        Arch("llada", AttentionMode.BIDIRECTIONAL, False, True, False, False),
    )
}

# unmask's per-layer parameter names -> GGUF's (``blk.N.`` + this + ``.weight`` / ``.bias``).
LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "attn.q_norm": "attn_q_norm",
    "attn.k_norm": "attn_k_norm",
    "mlp_norm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"embed": "token_embd", "norm": "output_norm", "head": "output"}


def gguf_name(name: str) -> str:
    """GGUF tensor name of an unmask parameter name (``layers.3.attn.q_proj.weight`` -> ``blk.3.attn_q.weight``)."""
    stem, _, kind = name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    _, layer, rest = stem.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{kind}"


def tensor_names(config: ModelConfig) -> dict[str, str]:
    """unmask parameter name -> GGUF tensor name, for every tensor a file of ``config`` holds."""
    from unmask.models.transformer import Transformer

    with torch.device("meta"):
        names = list(Transformer(config).state_dict())
    if config.tie_embeddings:
        names.remove("head.weight")
    return {n: gguf_name(n) for n in names}


def _rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    return weight.reshape(n_heads, -1, *weight.shape[1:])


def unpermute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from llama.cpp's interleaved pairs back to rotate-half order (weight or bias)."""
    w = _rows(weight, n_heads)
    half = w.shape[1] // 2
    return w.reshape(n_heads, half, 2, *w.shape[2:]).transpose(1, 2).reshape(weight.shape)


def permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``unpermute``: what llama.cpp's converter does to Q/K of llama-arch models."""
    w = _rows(weight, n_heads)
    half = w.shape[1] // 2
    return w.reshape(n_heads, 2, half, *w.shape[2:]).transpose(1, 2).reshape(weight.shape)
