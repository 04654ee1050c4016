"""Which decoding settings a run uses: the user's, else the model's own, else the caller's defaults.

A model directory may carry ``decoding.json``, the setting measured best for it (written from
its evaluation, see its model card), e.g. ``{"policy": "threshold", "threshold": 0.7, "cache":
"prefix"}``. Every front end (CLI, chat, server, playground) resolves its settings here:

- the *commit rule* (policy with its threshold, or a step count) comes whole from the first
  source that names one: what the user asked for, then ``decoding.json``, then the front end's
  default; a threshold alone implies the threshold policy, and the rule is never mixed across
  sources (a user's ``--steps`` does not inherit the model's threshold);
- ``block_size``: a block-causal model's own block, else the user's, the model's, the default;
- ``cache``: the user's, else the model's, else none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unmask.decoding.caches import CACHES
from unmask.decoding.policies import POLICIES
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig

DECODING_NAME = "decoding.json"
DEFAULT_BLOCK = 32  # semi-autoregressive block when nobody names one (block-causal models: their own)
KEYS = ("policy", "threshold", "tokens_per_step", "block_size", "cache")


@dataclass(frozen=True)
class DecodingChoice:
    """Decoding settings from one source; None = this source does not say."""

    policy: str | None = None
    threshold: float | None = None
    steps: int | None = None  # total steps over the canvas (the user's --steps)
    tokens_per_step: float | None = None  # decoding.json's step count, relative to the canvas length
    block_size: int | None = None
    cache: str | None = None

    @property
    def names_rule(self) -> bool:
        return self.policy is not None or self.threshold is not None or self.steps is not None or self.tokens_per_step is not None


def read_model_choice(path: Path) -> DecodingChoice:
    """The ``decoding.json`` beside a model's ``config.json`` (nothing for a file or a directory without one)."""
    from unmask.files import read_json_object

    if not Path(path).is_dir():
        return DecodingChoice()
    file = Path(path) / DECODING_NAME
    data = read_json_object(file)
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UnmaskError(f"{file}: unknown keys {unknown} (known: {', '.join(KEYS)})")

    def need(ok: bool, key: str, what: str) -> None:
        if key in data and not ok:
            raise UnmaskError(f"{file}: {key} must be {what}, got {data[key]!r}")

    policy, threshold = data.get("policy"), data.get("threshold")
    tps, block, cache = data.get("tokens_per_step"), data.get("block_size"), data.get("cache")
    need(policy in POLICIES, "policy", f"one of {', '.join(POLICIES)}")
    need(_number(threshold) and 0 <= threshold <= 1, "threshold", "a number in [0, 1]")
    need(_number(tps) and tps >= 1, "tokens_per_step", "a number >= 1")
    need(isinstance(block, int) and not isinstance(block, bool) and block >= 1, "block_size", "a positive integer")
    need(cache in CACHES, "cache", f"one of {', '.join(CACHES)}")
    return DecodingChoice(policy=policy, threshold=threshold, tokens_per_step=tps, block_size=block, cache=cache)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve(user: DecodingChoice, model: DecodingChoice, default: DecodingChoice, config: ModelConfig, max_new_tokens: int) -> dict[str, Any]:
    """``GenerationConfig`` fields (policy, threshold, steps, block_size, cache) from the three sources."""
    rule = next((c for c in (user, model, default) if c.names_rule), DecodingChoice())
    policy = rule.policy or ("threshold" if rule.threshold is not None else "confidence")
    if rule.threshold is not None and policy != "threshold":
        raise UnmaskError(f"a threshold applies to the threshold policy, not {policy}")
    steps = rule.steps
    if steps is None and rule.tokens_per_step is not None:
        steps = max(1, math.ceil(max_new_tokens / rule.tokens_per_step))
    if config.attention == "block":
        if user.block_size is not None and user.block_size != config.block_size:
            raise UnmaskError(f"this block-causal model decodes with block_size {config.block_size}, got {user.block_size}")
        block = config.block_size
    else:
        block = next((c.block_size for c in (user, model, default) if c.block_size is not None), DEFAULT_BLOCK)
    cache = next((c.cache for c in (user, model, default) if c.cache is not None), "none")
    out: dict[str, Any] = {"policy": policy, "steps": steps, "block_size": block, "cache": cache}
    if rule.threshold is not None:
        out["threshold"] = rule.threshold
    return out
