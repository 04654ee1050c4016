"""What a server serves and how: its models (each with an engine) and its limits."""

from __future__ import annotations

from dataclasses import dataclass

from unmask.engine import Engine
from unmask.loading import LoadedModel

DEFAULT_MAX_TOKENS = 128  # answer length when a request names none (cut to the context left)
DEFAULT_BLOCK = 32  # semi-autoregressive block when a request names none (block-causal models: their own)
DEFAULT_POLICY = "threshold"  # commit every prediction at least this sure, at least one per step
DEFAULT_THRESHOLD = 0.9  # the threshold policy's tau when a request names none


@dataclass
class ServeSettings:
    """Limits and access of one server process."""

    api_key: str | None = None  # required as "Authorization: Bearer KEY" on /v1/* when set
    max_model_len: int | None = None  # cap on prompt + answer tokens; None = each model's own context
    max_choices: int = 8  # most engine requests one HTTP request may make (n x prompts)
    max_stop: int = 4  # most stop strings per request
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    shutdown_timeout: float = 10.0  # seconds in-flight requests get to finish on shutdown
    retry_after_s: int = 1  # Retry-After header of a 429


@dataclass
class ServedModel:
    """A model under the name clients use, with the engine that runs its requests."""

    name: str  # the `model` field clients send
    loaded: LoadedModel  # weights + tokenizer + directory
    engine: Engine  # batches this model's requests
    max_len: int  # context the server allows: prompt + suffix + answer tokens

    @property
    def attention(self) -> str:
        return self.loaded.model.config.attention

    @property
    def diffusion(self) -> bool:
        """True for masked-diffusion models; False for autoregressive ones."""
        return self.attention != "causal"
