"""What a server serves and how: its models (each with an engine) and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from unmask.decoding.defaults import DecodingChoice
from unmask.engine import Engine
from unmask.loading import LoadedModel
from unmask.models.config import AttentionMode

# When a request names no commit rule: every prediction at least GenerationConfig's threshold sure,
# at least one per step (the answer's length, when it names none, is GenerationConfig's too).
DEFAULT_POLICY = "threshold"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # Host header names a loopback server always answers
MODEL_ALIASES = {"unmask-default": "default"}  # old names clients may still send -> the served name (the embedded model was "unmask-default")
NORMALIZER_SLACK = 3  # text a normalizer (NFC) may shrink by this factor before it is tokenised


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
    max_stop_chars: int = 512  # longest stop string
    template_timeout_s: float = 2.0  # wall-clock bound on rendering one chat template (in a worker process)
    template_max_chars: int = 1 << 20  # longest text a chat template may render
    # Host header names served (DNS-rebinding guard); "*" = any. The launcher adds the bound address.
    allowed_hosts: tuple[str, ...] = field(default_factory=lambda: LOOPBACK_HOSTS)


@dataclass
class ServedModel:
    """A model under the name clients use, with the engine that runs its requests."""

    name: str  # the `model` field clients send
    loaded: LoadedModel  # weights + tokenizer + directory
    engine: Engine  # batches this model's requests
    max_len: int  # context the server allows: prompt + suffix + answer tokens

    @cached_property
    def max_text_bytes(self) -> int:
        """UTF-8 bytes beyond which a text cannot fit the context, whatever its tokens: no token
        covers more than the longest token's bytes, so longer texts are refused untokenised."""
        tok = self.loaded.tokenizer
        longest = max((len(tok.token_bytes(i)) for i in range(tok.vocab_size)), default=1)
        slack = NORMALIZER_SLACK if tok.backend.normalizer is not None else 1
        return self.max_len * max(longest, 1) * slack

    @cached_property
    def decoding(self) -> DecodingChoice:
        """The model's own decoding setting (``decoding.json``), used for what a request leaves out."""
        return self.loaded.decoding

    @property
    def attention(self) -> str:
        return self.loaded.model.config.attention

    @property
    def diffusion(self) -> bool:
        """True for masked-diffusion models; False for autoregressive ones."""
        return self.attention != AttentionMode.CAUSAL
