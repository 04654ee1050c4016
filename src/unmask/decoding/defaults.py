"""Which decoding settings a run uses: the user's, else the model's own, else the caller's defaults.

A model directory may carry ``decoding.json``, the setting measured best for it (written from
its evaluation, see its model card), e.g. ``{"policy": "threshold", "threshold": 0.7, "cache":
"prefix"}``. Every front end (CLI, chat, server, playground) resolves its settings here:

- the *commit rule* (policy with its parameter, or a step count) comes whole from the first
  source that names one: what the user asked for, then ``decoding.json``, then the front end's
  default; a policy's parameter alone implies that policy (``commit_policy``: a threshold, the
  threshold policy), and the rule is never mixed across sources (a user's ``--steps`` does not
  inherit the model's threshold);
- ``block_size``: a block-causal model's own block, else the user's, the model's, the default;
- ``cache``: the user's, else the model's, else none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from unmask.decoding.settings import PARAMETERS, SETTING, SettingError
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode, ModelConfig

DECODING_NAME = "decoding.json"
DEFAULT_BLOCK = 32  # semi-autoregressive block when nobody names one (block-causal models: their own)
KEYS = ("policy", *(p.name for p in PARAMETERS), "tokens_per_step", "block_size", "cache")  # decoding.json's


@dataclass(frozen=True)
class DecodingChoice:
    """Decoding settings from one source; None = this source does not say."""

    policy: str | None = None
    threshold: float | None = None
    factor: float | None = None
    steps: int | None = None  # total steps over the canvas (the user's --steps)
    tokens_per_step: float | None = None  # decoding.json's step count, relative to the canvas length
    block_size: int | None = None
    cache: str | None = None

    @property
    def names_rule(self) -> bool:
        rule = ("policy", "steps", "tokens_per_step", *(p.name for p in PARAMETERS))
        return any(getattr(self, name) is not None for name in rule)


CHOSEN = tuple(f.name for f in fields(DecodingChoice) if f.name in SETTING)  # the settings ``resolve`` decides


def choose(values: dict[str, Any]) -> tuple[DecodingChoice, dict[str, Any]]:
    """A front end's values (``GenerationConfig`` field -> value, None = not given) split into the choice
    ``resolve`` completes and the rest, which go to ``GenerationConfig`` as given (None left out)."""
    choice = DecodingChoice(**{name: values.get(name) for name in CHOSEN})
    rest = {name: value for name, value in values.items() if name not in CHOSEN and value is not None}
    return choice, rest


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
    for key, value in data.items():
        if key == "tokens_per_step":
            problem = None if _number(value) and value >= 1 else "must be a number >= 1"
        else:
            problem = SETTING[key].problem(value)
        if problem:
            raise UnmaskError(f"{file}: {key} {problem}, got {value!r}")
    return DecodingChoice(**data)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def commit_policy(rule: DecodingChoice) -> str:
    """The policy a commit rule names: its own, else the one whose parameter it gives (a threshold alone
    means the threshold policy), else ``GenerationConfig``'s default. A parameter of another policy
    than the one named is an error: a threshold means nothing to ``margin``."""
    given = [p for p in PARAMETERS if getattr(rule, p.name) is not None]
    policy = rule.policy
    if policy is None:
        owners = list(dict.fromkeys(p.policy for p in given))
        if len(owners) > 1:
            raise SettingError(given[-1].name, f"{' and '.join(p.name for p in given)} belong to different policies")
        policy = owners[0] if owners else SETTING["policy"].default
    for p in given:
        if p.policy != policy:
            raise SettingError(p.name, f"a {p.name} applies to the {p.policy} policy, not {policy}")
    return policy


def resolve(user: DecodingChoice, model: DecodingChoice, default: DecodingChoice, config: ModelConfig, max_new_tokens: int) -> dict[str, Any]:
    """``GenerationConfig`` fields (policy and its parameter, steps, block_size, cache) from the three sources."""
    rule = next((c for c in (user, model, default) if c.names_rule), DecodingChoice())
    policy = commit_policy(rule)
    steps = rule.steps
    if steps is None and rule.tokens_per_step is not None:
        steps = max(1, math.ceil(max_new_tokens / rule.tokens_per_step))
    if config.attention == AttentionMode.BLOCK:
        if user.block_size is not None and user.block_size != config.block_size:
            raise SettingError("block_size", f"this block-causal model decodes with block_size {config.block_size}, "
                               f"got {user.block_size}")
        block = config.block_size
    else:
        block = next((c.block_size for c in (user, model, default) if c.block_size is not None), DEFAULT_BLOCK)
    cache = next((c.cache for c in (user, model, default) if c.cache is not None), SETTING["cache"].default)
    out: dict[str, Any] = {"policy": policy, "steps": steps, "block_size": block, "cache": cache}
    out.update({p.name: getattr(rule, p.name) for p in PARAMETERS if getattr(rule, p.name) is not None})
    return out
