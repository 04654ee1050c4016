"""Model configuration: one dataclass, saved as ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError
from unmask.files import read_json_object

class AttentionMode(StrEnum):
    """Which keys a query may see; it decides how a model decodes. A ``str``, so that it is written to
    and read from config files as its name, and compares equal to it."""

    BIDIRECTIONAL = "bidirectional"  # every key: masked diffusion, any-order infilling
    CAUSAL = "causal"  # keys at or before the query: an AR model, decoded token by token
    BLOCK = "block"  # keys in the query's block or earlier ones: block diffusion, blocks aligned to positions


ATTENTION_MODES = tuple(AttentionMode)


# Sane upper bounds on the shapes a config.json may ask for, checked before anything is built or
# allocated (the largest published models are far inside them); the weights' headers are then
# checked against the config before a byte of weights is read.
LIMITS = {
    "vocab_size": 1 << 24, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024,
    "head_dim": 1 << 12, "d_ff": 1 << 20, "max_seq_len": 1 << 24, "block_size": 1 << 24,
}
_FLAGS = ("qkv_bias", "qk_norm", "tie_embeddings", "shifted")
_TOKEN_IDS = ("mask_token_id", "eos_token_id", "pad_token_id")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ModelConfig:
    """Shape and special tokens of a transformer; knows nothing of diffusion schedules."""

    vocab_size: int = 4096  # rows of the embedding and of the output head
    d_model: int = 256  # width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    head_dim: int | None = None  # width of one attention head; None = d_model // n_heads (Qwen3 sets it apart)
    d_ff: int | None = None  # hidden width of the SwiGLU MLP; None = 8/3 * d_model rounded up to 64
    max_seq_len: int = 512  # longest sequence (prompt + answer) the model was trained for
    rope_theta: float = 10000.0  # base of the rotary position frequencies
    norm_eps: float = 1e-5  # epsilon of every RMSNorm
    attention: AttentionMode = AttentionMode.BIDIRECTIONAL  # bidirectional (diffusion), causal (AR), block (block diffusion)
    block_size: int = 32  # block length of block-causal attention; unused by the other modes
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2-style checkpoints)
    qk_norm: bool = False  # RMSNorm on each query/key head before rotary positions (Qwen3-style checkpoints)
    usable_vocab: int | None = None  # ids >= this get logit -inf: embedding rows past the tokenizer's vocabulary
    tie_embeddings: bool = False  # share the embedding matrix with the output head
    shifted: bool = False  # logits at position i predict token i + 1 (AR models, Dream-style dLLMs)
    mask_token_id: int | None = None  # id of [MASK]; required for diffusion decoding
    eos_token_id: int | None = None  # end-of-text id: generation stops here
    pad_token_id: int | None = None  # padding id (never attended to)
    init_std: float = 0.02  # std of the normal weight initialisation
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance (e.g. source checkpoint)

    def __post_init__(self) -> None:
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 64 * -(-(8 * self.d_model // 3) // 64)
        if self.head_dim is None and _positive(self.d_model) and _positive(self.n_heads):
            if self.d_model % self.n_heads:
                raise UnmaskError(f"invalid model config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        self.validate()

    def _check_types(self) -> None:
        """Every field's JSON type (bools are bools, numbers are numbers), before anything computes with them."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UnmaskError(f"invalid model config: {msg}")

        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is None and name in ("n_kv_heads", "head_dim", "d_ff"):
                continue
            need(_positive(value), f"{name} must be a positive integer, got {value!r}")
            need(value <= limit, f"{name} {value} is beyond the largest supported ({limit})")
        need(isinstance(self.attention, str) and self.attention in ATTENTION_MODES,
             f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        self.attention = AttentionMode(self.attention)
        for name in _FLAGS:
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        need(_finite(self.rope_theta) and self.rope_theta > 0, f"rope_theta must be a positive number, got {self.rope_theta!r}")
        need(_finite(self.norm_eps) and 0 < self.norm_eps < 1, f"norm_eps must be a number in (0, 1), got {self.norm_eps!r}")
        need(_finite(self.init_std) and self.init_std >= 0, f"init_std must be a number >= 0, got {self.init_std!r}")
        for name in (*_TOKEN_IDS, "usable_vocab"):
            value = getattr(self, name)
            need(value is None or _integer(value), f"{name} must be an integer or null, got {value!r}")
        need(isinstance(self.extra, dict), f"extra must be an object, got {type(self.extra).__name__}")

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UnmaskError(f"invalid model config: {msg}")

        self._check_types()
        for name in LIMITS:
            value = getattr(self, name)
            need(_positive(value), f"{name} must be a positive integer, got {value!r}")
        need(self.head_dim % 2 == 0, f"head dimension {self.head_dim} must be even for rotary embeddings")
        need(
            self.usable_vocab is None or (isinstance(self.usable_vocab, int) and 0 < self.usable_vocab <= self.vocab_size),
            f"usable_vocab must be in [1, vocab_size], got {self.usable_vocab!r}",
        )
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        need(self.n_kv_heads <= self.n_heads, f"n_kv_heads {self.n_kv_heads} exceeds n_heads {self.n_heads}")
        for name in _TOKEN_IDS:
            value = getattr(self, name)
            need(value is None or 0 <= value < self.vocab_size, f"{name} {value} is outside the vocabulary")

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "unmask", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ModelConfig":
        data = {k: v for k, v in data.items() if k != "model_type"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UnmaskError(f"{source}: unknown config keys {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UnmaskError(f"{source}: {exc}") from None
        except UnmaskError as exc:
            raise UnmaskError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        return cls.from_dict(read_json_object(path, missing_ok=False), source=str(path))
