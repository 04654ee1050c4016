"""How to decode: one settings object shared by diffusion and AR decoding, the engine and the server."""

from __future__ import annotations

from dataclasses import dataclass

from unmask.decoding.caches import CACHES
from unmask.decoding.defaults import DEFAULT_BLOCK
from unmask.decoding.policies import POLICIES
from unmask.errors import UnmaskError


@dataclass
class GenerationConfig:
    """How to decode; shared by diffusion and AR decoding."""

    max_new_tokens: int = 128  # canvas length N (for infill: the middle's length)
    block_size: int | None = DEFAULT_BLOCK  # semi-AR block; None or >= N = pure diffusion (one block)
    steps: int | None = None  # total denoising steps over the canvas; None = one token per step; threshold/factor: a cap
    policy: str = "confidence"  # random | random_count | confidence | margin | entropy | threshold | factor
    threshold: float = 0.9  # tau for `threshold`
    factor: float = 1.0  # f for `factor`
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 = sample from the tempered softmax
    top_k: int | None = None  # keep only the k most probable tokens before sampling
    top_p: float | None = None  # keep the smallest set of tokens whose probability reaches p
    seed: int | None = None  # per-row seed; same seed -> same output alone or in a batch
    stop_at_eos: bool = True  # end a row once EOS is committed and everything before it is decided
    stop_ids: tuple[int, ...] = ()  # more tokens that end a row like EOS (a chat template's end-of-turn)
    trace: bool = False  # keep a copy of the canvas after every step
    cache: str = "none"  # none | prefix | dual: approximate block KV cache (bidirectional); block-causal models: exact
    cache_refresh: int | None = None  # approximate caches: also recompute everything every this many steps

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UnmaskError(f"invalid generation config: {msg}")

        need(self.policy in POLICIES, f"unknown policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.block_size is None or self.block_size >= 1, f"block_size must be >= 1 or None, got {self.block_size}")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1 or None, got {self.steps}")
        need(0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}")
        need(self.factor > 0, f"factor must be > 0, got {self.factor}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or None, got {self.top_k}")
        need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.cache in CACHES, f"unknown cache {self.cache!r} (choose from {', '.join(CACHES)})")
        need(self.cache_refresh is None or self.cache_refresh >= 1, f"cache_refresh must be >= 1, got {self.cache_refresh}")
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
