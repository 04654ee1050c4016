"""OpenAI request and response bodies (completions, chat completions, fill-in-the-middle).

Requests are validated strictly (no string-to-number coercion) so that wrong types are 400s
naming the field. Unknown fields are ignored, as OpenAI-compatible servers commonly do. The
decoding fields (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed`` and the diffusion
knobs ``steps``, ``block_size``, ``policy``, ``threshold``, ``factor``) are made from the one
declaration of the decoding settings (``unmask.decoding.settings``), with its types and bounds;
autoregressive models ignore the diffusion knobs. ``diffusing`` asks a stream for every step.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from unmask.decoding.settings import SETTING, SETTINGS, Setting

STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False  # send a last chunk with the usage before [DONE]


def request_field(setting: Setting) -> tuple[Any, FieldInfo]:
    """A declared setting as an optional request field (None = not given): its choices as a
    ``Literal``, its bounds as constraints, its help as the description."""
    kind: Any = Literal[setting.choices] if setting.choices else setting.kind
    return kind | None, Field(None, description=setting.help, **setting.bounds.pydantic())


# Every decoding setting a request may choose, under its field name (``max_tokens`` for max_new_tokens).
DecodingFields = create_model(
    "DecodingFields", __config__=STRICT, **{s.field: request_field(s) for s in SETTINGS if s.field is not None}
)


class GenerationFields(DecodingFields):  # type: ignore[misc, valid-type]
    """Fields every generating endpoint shares: the decoding settings (``DecodingFields``; None = the
    server's default, ``max_tokens`` cut to the context) and OpenAI's others."""

    model_config = STRICT

    model: str | None = None  # served model name; None = the first served model
    max_completion_tokens: int | None = request_field(SETTING["max_new_tokens"])[1]  # newer name of max_tokens; wins
    n: int = Field(1, ge=1)  # choices per prompt; choice i uses seed + i
    stop: Union[str, list[str], None] = None  # strings that end the text (not included in it)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    diffusing: bool = False  # streaming only: the whole canvas after every step

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]  # text, texts, token ids or lists of them
    suffix: str | None = None  # text after the completion: the answer is written in between
    token_healing: bool = True  # text prompts: back up to a kept token boundary; the answer re-spells the cut
    echo: bool = False  # not supported (rejected when true)
    logprobs: int | None = None  # not supported (rejected when set)


class TextPart(BaseModel):
    model_config = STRICT

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = STRICT

    role: str
    content: Union[str, list[TextPart], None] = None


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage]
    logprobs: bool | None = None  # not supported (rejected when true)


class FimRequest(GenerationFields):
    prompt: str  # the text before the middle
    suffix: str = ""  # the text after the middle
    token_healing: bool = True  # back the prompt up to a kept token boundary; the middle re-spells the cut


# ---------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DecodingStats(BaseModel):
    """The ``unmask`` extra field of a non-streaming response."""

    steps: int  # most denoising steps any choice took (AR: tokens)
    tokens_per_step: float  # answer tokens per step, over all choices
    elapsed_s: float  # seconds from receipt to answer


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    unmask: DecodingStats


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    unmask: DecodingStats


class Canvas(BaseModel):
    """The generated region after one step, for clients that animate the denoising."""

    step: int  # 1-based step of this request
    tokens: list[str | None]  # text of each generated position; None = still masked
    committed: list[int]  # positions written by this step
    masked: int  # number of None entries


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "unmask"
    attention: str  # bidirectional | block | causal
    diffusion: bool  # False for autoregressive models
    max_model_len: int  # prompt + answer tokens the server allows


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def chunk_choice(kind: str, index: int, delta: str, finish: str | None, canvas: Canvas | None,
                 role: bool = False) -> dict[str, Any]:
    """One choice of a streamed chunk (completion or chat form)."""
    if kind == "chat":
        body: dict[str, Any] = {"index": index, "delta": {"role": "assistant", "content": delta} if role else {"content": delta}}
    else:
        body = {"index": index, "text": delta, "logprobs": None}
    body["finish_reason"] = finish
    if canvas is not None:
        body["canvas"] = canvas.model_dump()
    return body
