"""Model configuration: one dataclass, saved as ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unmask.errors import UnmaskError

AttentionMode = Literal["bidirectional", "causal", "block"]
ATTENTION_MODES = ("bidirectional", "causal", "block")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and value > 0


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
    attention: AttentionMode = "bidirectional"  # bidirectional (diffusion), causal (AR), block (block diffusion)
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
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 64 * -(-(8 * self.d_model // 3) // 64)
        if self.head_dim is None and _positive(self.d_model) and _positive(self.n_heads):
            if self.d_model % self.n_heads:
                raise UnmaskError(f"invalid model config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UnmaskError(f"invalid model config: {msg}")

        need(self.attention in ATTENTION_MODES, f"attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len", "block_size"):
            value = getattr(self, name)
            need(_positive(value), f"{name} must be a positive integer, got {value!r}")
        need(self.head_dim % 2 == 0, f"head dimension {self.head_dim} must be even for rotary embeddings")
        need(
            self.usable_vocab is None or (isinstance(self.usable_vocab, int) and 0 < self.usable_vocab <= self.vocab_size),
            f"usable_vocab must be in [1, vocab_size], got {self.usable_vocab!r}",
        )
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
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

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UnmaskError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UnmaskError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UnmaskError(f"{path}: expected a JSON object")
        return cls.from_dict(data, source=str(path))
