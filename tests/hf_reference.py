"""Independent plain-PyTorch forward passes of the published architectures, in float64.

Written from the published descriptions, on the checkpoint's own tensor names and config.json
keys, and sharing no code with unmask (no ``unmask`` import): explicit matmul attention with an
explicit mask, RoPE by ``rotate_half``, RMSNorm in high precision, GQA by repeating key/value heads.

- LLaDA (OLMo "llama" block): x += attn_out(attn(q_proj, k_proj, v_proj of attn_norm(x)));
  x += ff_out(silu(ff_proj(h)) * up_proj(h)) with h = ff_norm(x); logits = ff_out(ln_f(x)).
  Bidirectional attention.
- Dream (Qwen2 layout, q/k/v biases): bidirectional attention. Logits are returned unshifted:
  position i's logits predict token i + 1, which the decoder accounts for.
- Fast-dLLM v2 (Qwen2.5 layout, q/k/v biases): block-causal attention, query block >= key block
  with blocks of ``bd_size`` counted from position 0.
- SDAR (Qwen3 layout): RMSNorm over each query/key head (``q_norm``/``k_norm``) before RoPE,
  explicit ``head_dim``, block-causal attention, tied head when ``tie_word_embeddings``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

DTYPE = torch.float64


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight.to(DTYPE) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = x @ weight.to(DTYPE).T
    return out if bias is None else out + bias.to(DTYPE)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """x [B, H, T, D] rotated by the angles of ``positions`` [T] (frequencies theta^(-2i/D))."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=DTYPE) / dim))
    angles = positions.to(DTYPE)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """Softmax attention; k/v heads are repeated to the query heads (head h uses kv head h // group)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def allowed_mask(length: int, block_size: int | None) -> Tensor:
    """[T, T] True where query i may attend key j: everywhere, or key block <= query block."""
    if block_size is None:
        return torch.ones(length, length, dtype=torch.bool)
    block = torch.arange(length) // block_size
    return block[None, :] <= block[:, None]


def heads(x: Tensor, n: int, dim: int) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n, dim).transpose(1, 2)


def llada_logits(w: dict[str, Tensor], cfg: dict[str, Any], ids: Tensor) -> Tensor:
    p = "model.transformer."
    n_heads, eps, theta = cfg["n_heads"], cfg["rms_norm_eps"], cfg["rope_theta"]
    n_kv = cfg.get("n_kv_heads") or n_heads
    dim = cfg["d_model"] // n_heads
    t = ids.shape[1]
    pos, allowed = torch.arange(t), allowed_mask(t, None)
    x = w[f"{p}wte.weight"].to(DTYPE)[ids]
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        h = rms_norm(x, w[f"{b}attn_norm.weight"], eps)
        q = rope(heads(linear(h, w[f"{b}q_proj.weight"]), n_heads, dim), pos, theta)
        k = rope(heads(linear(h, w[f"{b}k_proj.weight"]), n_kv, dim), pos, theta)
        v = heads(linear(h, w[f"{b}v_proj.weight"]), n_kv, dim)
        att = attention(q, k, v, allowed).transpose(1, 2).reshape(x.shape[0], t, -1)
        x = x + linear(att, w[f"{b}attn_out.weight"])
        h = rms_norm(x, w[f"{b}ff_norm.weight"], eps)
        gate = linear(h, w[f"{b}ff_proj.weight"])
        x = x + linear(gate * torch.sigmoid(gate) * linear(h, w[f"{b}up_proj.weight"]), w[f"{b}ff_out.weight"])
    x = rms_norm(x, w[f"{p}ln_f.weight"], eps)
    head = w[f"{p}wte.weight"] if cfg.get("weight_tying") else w[f"{p}ff_out.weight"]
    return linear(x, head)


def qwen_logits(w: dict[str, Tensor], cfg: dict[str, Any], ids: Tensor, block_size: int | None, qk_norm: bool) -> Tensor:
    n_heads, eps, theta = cfg["num_attention_heads"], cfg["rms_norm_eps"], cfg["rope_theta"]
    n_kv = cfg["num_key_value_heads"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    t = ids.shape[1]
    pos, allowed = torch.arange(t), allowed_mask(t, block_size)
    x = w["model.embed_tokens.weight"].to(DTYPE)[ids]
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        h = rms_norm(x, w[f"{b}input_layernorm.weight"], eps)
        q = heads(linear(h, w[f"{b}self_attn.q_proj.weight"], w.get(f"{b}self_attn.q_proj.bias")), n_heads, dim)
        k = heads(linear(h, w[f"{b}self_attn.k_proj.weight"], w.get(f"{b}self_attn.k_proj.bias")), n_kv, dim)
        v = heads(linear(h, w[f"{b}self_attn.v_proj.weight"], w.get(f"{b}self_attn.v_proj.bias")), n_kv, dim)
        if qk_norm:
            q = rms_norm(q, w[f"{b}self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[f"{b}self_attn.k_norm.weight"], eps)
        q, k = rope(q, pos, theta), rope(k, pos, theta)
        att = attention(q, k, v, allowed).transpose(1, 2).reshape(x.shape[0], t, -1)
        x = x + linear(att, w[f"{b}self_attn.o_proj.weight"])
        h = rms_norm(x, w[f"{b}post_attention_layernorm.weight"], eps)
        gate = linear(h, w[f"{b}mlp.gate_proj.weight"])
        x = x + linear(gate * torch.sigmoid(gate) * linear(h, w[f"{b}mlp.up_proj.weight"]), w[f"{b}mlp.down_proj.weight"])
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return linear(x, head)


def reference_logits(family: str, weights: dict[str, Tensor], cfg: dict[str, Any], ids: Tensor) -> Tensor:
    """Float64 logits [B, T, rows] of the published architecture of ``family``."""
    w = {k: v.to(DTYPE) for k, v in weights.items()}
    if family == "llada":
        return llada_logits(w, cfg, ids)
    if family == "dream":
        return qwen_logits(w, cfg, ids, block_size=None, qk_norm=False)
    if family == "fast_dllm_v2":
        return qwen_logits(w, cfg, ids, block_size=cfg.get("bd_size", 32), qk_norm=False)
    if family == "sdar":
        return qwen_logits(w, cfg, ids, block_size=cfg.get("block_size", 4), qk_norm=True)
    raise ValueError(family)
