"""One transformer for every attention mode: bidirectional, causal and block-causal.

RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention through
``scaled_dot_product_attention``. Attention masks are derived from token *positions*, not
array indices, so left-padded batches and KV caches holding any slice of a sequence all
see the same attention pattern as an unpadded, uncached run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unmask.models.config import AttentionMode, ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the casts below would be no-ops, each a dispatch
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


def rotary(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables of shape [B, 1, T, head_dim] for the given positions [B, T]; the first half of
    sin is negated, which folds rotate-half's negation into the table (bit for bit the same products,
    one op fewer per call of ``apply_rotary``)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    sin = emb.sin()
    sin[..., : head_dim // 2].neg_()
    return emb.cos(), sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    if x.dtype == torch.float32:
        return x * cos + swapped * sin
    return (x.float() * cos + swapped.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer for slots ``[0, length)`` of a preallocated buffer.

    ``positions`` and ``valid`` describe each slot, so the attention mask of a cached key is
    computed exactly as if it were part of the current forward pass. A forward pass writes its
    keys at slots ``[start, start + T)`` and attends over ``[0, max(length, start + T))``:
    appending (AR, exact block cache) and overwriting a block in the middle while keeping the
    suffix (dual cache) are both the same call. ``truncate`` drops the suffix (prefix cache).
    """

    keys: list[Tensor]
    values: list[Tensor]
    positions: Tensor
    valid: Tensor
    length: int = 0

    @classmethod
    def allocate(
        cls, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> "KVCache":
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)],
            positions=torch.zeros(batch, max_len, dtype=torch.long, device=device),
            valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def write_meta(self, start: int | Tensor, positions: Tensor, valid: Tensor) -> None:
        """``start``: the first slot, or (static shapes) a device tensor: a scalar first slot or the
        1-d slots themselves; attention then spans the whole buffer."""
        if isinstance(start, Tensor):
            slots = start if start.dim() == 1 else start + torch.arange(positions.shape[1], device=positions.device)
            self.positions.index_copy_(1, slots, positions)
            self.valid.index_copy_(1, slots, valid)
            self.length = self.capacity
            return
        end = start + positions.shape[1]
        if start < 0 or end > self.capacity:
            raise ValueError(f"cache slots [{start}, {end}) outside capacity {self.capacity}")
        self.positions[:, start:end] = positions
        self.valid[:, start:end] = valid
        self.length = max(self.length, end)

    def write(self, layer: int, start: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(start, Tensor):
            slots = start if start.dim() == 1 else start + torch.arange(k.shape[2], device=k.device)
            self.keys[layer].index_copy_(2, slots, k)
            self.values[layer].index_copy_(2, slots, v)
            return self.keys[layer], self.values[layer]
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, : self.length], self.values[layer][:, :, : self.length]


def attention_mask(
    mode: AttentionMode, block_size: int, q_pos: Tensor, k_pos: Tensor, k_valid: Tensor | None
) -> Tensor | None:
    """Boolean mask [B, 1, Tq, Tk] (True = may attend), or None when every key is visible."""
    if mode == AttentionMode.BIDIRECTIONAL:
        if k_valid is None:
            return None
        mask = k_valid[:, None, :].expand(-1, q_pos.shape[1], -1)
    elif mode == AttentionMode.CAUSAL:
        mask = k_pos[:, None, :] <= q_pos[:, :, None]
    else:
        mask = (k_pos[:, None, :] // block_size) <= (q_pos[:, :, None] // block_size)
    if k_valid is not None and mode != AttentionMode.BIDIRECTIONAL:
        mask = mask & k_valid[:, None, :]
    # A query that may see no key at all (a padding slot) attends everywhere instead of
    # producing NaN; its output is never used.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        cache: KVCache | None,
        layer: int,
        cache_start: int | Tensor,
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.write(layer, cache_start, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope, mask, cache, layer: int, cache_start: int | Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache, layer, cache_start)
        return x + self.mlp(self.mlp_norm(x))


class StreamingLinear(nn.Linear):
    """``nn.Linear`` that streams its weight once for inputs of 2 to 8 rows on a CPU in float32.

    There MKL's GEMM with a transposed weight (what ``F.linear`` runs) packs the weight and is 2-3x
    slower than the one-row GEMV; ``weight @ x.T`` reads it once (SmolLM2-135M's 49152x576 head
    at the 2-4 rows of a diffusion step: ~10 ms instead of ~20-30 ms, 1 thread). Same sums; the
    rounding of a logit may differ in the last bit. Other inputs (one row, prefill, training, GPU)
    take ``F.linear``.
    """

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        w = self.weight
        if 2 <= rows <= 8 and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32:
            out = (w @ x.reshape(rows, x.shape[-1]).t()).t().contiguous().view(*x.shape[:-1], w.shape[0])
            return out if self.bias is None else out + self.bias
        return F.linear(x, w, self.bias)


def select_positions(x: Tensor, index: Tensor | slice | None) -> Tensor:
    """``x`` [B, T, ...] at ``index``: all (None), shared columns (slice or 1-d), or a [B, T] bool mask (flat)."""
    if index is None:
        return x
    if isinstance(index, Tensor) and index.dtype == torch.bool and index.dim() == 2:
        return x[index]
    return x[:, index]


class Transformer(nn.Module):
    """ids [B, T] (+ positions, key validity, optional KV cache) -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Built under torch.device("meta") to be filled from a checkpoint: skip the random
        # initialisation, which means nothing there and whose meta kernel is slow to load.
        meta = torch.empty(0).is_meta
        blank = torch.empty(config.vocab_size, config.d_model) if meta else None
        self.embed = nn.Embedding(config.vocab_size, config.d_model, _weight=blank)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = StreamingLinear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        if not meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, std=std)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        ids: Tensor,
        positions: Tensor | None = None,
        valid: Tensor | None = None,
        cache: KVCache | None = None,
        cache_start: int | Tensor | None = None,
        logits_index: Tensor | slice | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits for ``ids``.

        positions: [B, T] position of each token (default 0..T-1, or continuing the cache).
        valid: [B, T] False for padding, which no query attends to.
        cache: keys/values of earlier slots; this call's are written at ``cache_start``
            (default: appended after ``cache.length``). A tensor ``cache_start`` keeps every
            shape static (for CUDA graphs): slots are written by index and attention spans the
            whole buffer, its unwritten slots masked by ``cache.valid``; ``positions`` is required.
        logits_index: which of the T positions to compute logits for (default all); a [B, T]
            boolean tensor selects positions row by row and gives flat [N, V] logits.
        attn_mask: [B, 1, T, S] boolean mask replacing the one the attention mode implies
            (training objectives that attend in patterns no mode describes, e.g. block diffusion).
        """
        b, t = ids.shape
        start = 0
        if cache is not None:
            start = cache.length if cache_start is None else cache_start
        if positions is None:
            if isinstance(start, Tensor):
                raise ValueError("a tensor cache_start needs explicit positions")
            positions = torch.arange(start, start + t, device=ids.device).expand(b, t)
        if cache is not None:
            if valid is None:
                valid = torch.ones(b, t, dtype=torch.bool, device=ids.device)
            if isinstance(start, Tensor) and start.dim() == 0:  # the slots once, not once per layer
                start = start + torch.arange(t, device=ids.device)
            cache.write_meta(start, positions, valid)
            k_pos, k_valid = cache.positions[:, : cache.length], cache.valid[:, : cache.length]
        else:
            k_pos, k_valid = positions, valid
        if attn_mask is not None:
            mask = attn_mask
        else:
            mask = attention_mask(self.config.attention, self.config.block_size, positions, k_pos, k_valid)
        if mask is not None and mask.dtype == torch.bool and mask.device.type == "cpu":
            # What scaled_dot_product_attention turns a boolean mask into on a CPU (0 / -inf in the
            # query dtype), done once per forward instead of once per layer: bit for bit the same.
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        rope = rotary(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, i, start)
        x = self.norm(x)
        x = select_positions(x, logits_index)
        logits = self.head(x).float()
        usable = self.config.usable_vocab
        if usable is not None and usable < self.config.vocab_size:  # rows no tokenizer id maps to
            logits[..., usable:] = float("-inf")
        return logits
