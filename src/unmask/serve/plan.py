"""From a validated request body to the engine requests that answer it.

Checks everything that needs the model or the tokenizer (context length, token ids, chat
messages, diffusion knobs) and raises a 400 ``APIError`` naming the field at fault. One HTTP
request becomes ``prompts x n`` engine requests; choice i of a prompt uses seed + i.

Planning is CPU work and runs in a worker thread (see ``app``). A text longer in UTF-8 bytes
than ``ServedModel.max_text_bytes`` cannot fit the context and is refused before the tokenizer
sees it; chat templates render in a bounded worker process (``render.TemplateRenderer``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from unmask.decoding import GenerationConfig, Healing, heal_batch
from unmask.decoding.canvas import end_ids
from unmask.decoding.defaults import DecodingChoice, choose, resolve
from unmask.decoding.settings import SETTING, SETTINGS, SettingError
from unmask.engine import EngineRequest
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode
from unmask.serve.errors import APIError, bad_request
from unmask.serve.render import TemplateRenderer
from unmask.serve.schemas import ChatCompletionRequest, CompletionRequest, FimRequest, GenerationFields
from unmask.serve.settings import DEFAULT_POLICY, ServedModel, ServeSettings


@dataclass
class Choice:
    """One engine request and what the server needs to turn its tokens into text."""

    index: int  # the choice's index in the response
    request: EngineRequest
    ends: set[int]  # tokens that end the answer
    prompt_tokens: int  # prompt (+ suffix) tokens, for usage


@dataclass
class Plan:
    """Everything a response needs, decided before anything is submitted."""

    kind: str  # "completion" | "chat" (the response format)
    choices: list[Choice]
    stops: list[str]  # stop strings applied to the text
    stream: bool
    diffusing: bool
    include_usage: bool
    prompt_tokens: int  # usage: every distinct prompt counted once


def plan_completion(body: CompletionRequest, served: ServedModel, settings: ServeSettings,
                    renderer: TemplateRenderer | None = None) -> Plan:
    if body.echo:
        raise bad_request("echo is not supported", param="echo")
    if body.logprobs:
        raise bad_request("logprobs are not supported", param="logprobs")
    _check_stops(body, settings)
    prompts = _prompt_ids(body.prompt, served, settings.max_choices)
    suffix = None
    if body.suffix:
        suffix = _encode(served, body.suffix, "suffix")
    texts = isinstance(body.prompt, str) or all(isinstance(p, str) for p in body.prompt)  # ids are taken as given
    prompts, heals = heal_batch(served.loaded.tokenizer, prompts, body.token_healing and texts)
    return _plan(body, served, settings, "completion", prompts, suffix, chat=False, heals=heals)


def plan_chat(body: ChatCompletionRequest, served: ServedModel, settings: ServeSettings,
              renderer: TemplateRenderer | None = None) -> Plan:
    if body.logprobs:
        raise bad_request("logprobs are not supported", param="logprobs")
    if not body.messages:
        raise bad_request("messages must not be empty", param="messages")
    messages = []
    for k, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"only text content parts are supported, got {part.type!r}",
                                      param=f"messages.{k}.content.{j}")
                texts.append(part.text)
            content = "".join(texts)
        messages.append({"role": m.role, "content": content or ""})
    _check_stops(body, settings)
    _check_size(served, sum(len(m["content"].encode("utf-8")) for m in messages), "messages")
    try:
        render = renderer.render if renderer is not None else None
        ids = served.loaded.tokenizer.encode_chat(messages, render=render)
    except UnmaskError as exc:
        raise bad_request(str(exc), param="messages") from None
    return _plan(body, served, settings, "chat", [ids], None, chat=True)


def plan_fim(body: FimRequest, served: ServedModel, settings: ServeSettings,
             renderer: TemplateRenderer | None = None) -> Plan:
    if served.attention != AttentionMode.BIDIRECTIONAL:
        raise bad_request(
            f"fill-in-the-middle needs a bidirectional diffusion model; {served.name} is {served.attention}",
            param="model",
        )
    if not body.prompt and not body.suffix:
        raise bad_request("prompt and suffix are both empty", param="prompt")
    _check_stops(body, settings)
    _check_size(served, len(body.prompt.encode("utf-8")) + len(body.suffix.encode("utf-8")), "prompt")
    prompt, suffix = _encode(served, body.prompt, "prompt"), _encode(served, body.suffix, "suffix")
    prompts, heals = heal_batch(served.loaded.tokenizer, [prompt], body.token_healing)
    return _plan(body, served, settings, "completion", prompts, suffix, chat=False, heals=heals)


def _check_size(served: ServedModel, size: int, param: str) -> None:
    """Refuse a text that cannot fit the context before it is tokenised in full."""
    if size > served.max_text_bytes:
        raise bad_request(
            f"{param} is {size} bytes long: more than the context of {served.max_len} tokens can hold "
            f"(at most {served.max_text_bytes} bytes with this tokenizer)", param=param, code="context_length_exceeded")


def _encode(served: ServedModel, text: str, param: str) -> list[int]:
    _check_size(served, len(text.encode("utf-8")), param)
    return served.loaded.tokenizer.encode(text)


def _check_stops(body: GenerationFields, settings: ServeSettings) -> None:
    stops = body.stop_strings
    if len(stops) > settings.max_stop:
        raise bad_request(f"at most {settings.max_stop} stop strings are allowed, got {len(stops)}", param="stop")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", param="stop")
    if any(len(s) > settings.max_stop_chars for s in stops):
        raise bad_request(f"stop strings must be at most {settings.max_stop_chars} characters", param="stop")


def _prompt_ids(prompt: str | list, served: ServedModel, max_choices: int) -> list[list[int]]:
    """Token ids of each prompt (text or ids), refusing empty ones and ids outside the vocabulary.

    Sizes are checked before any text is tokenised: too many prompts for ``max_choices``, or a
    prompt too long for the context, is refused untokenised."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt must not be empty", param="prompt")
    if len(items) > max_choices:
        raise bad_request(f"{len(items)} prompts ask for more than the {max_choices} choices allowed", param="n")
    vocab = served.loaded.model.config.vocab_size
    out = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            ids = _encode(served, item, "prompt")
        else:
            if len(item) > served.max_len:
                raise bad_request(f"prompt {k} has {len(item)} tokens; the context holds {served.max_len}",
                                  param="prompt", code="context_length_exceeded")
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary (size {vocab})", param="prompt")
            ids = list(item)
        if not ids:
            raise bad_request("prompt must not be empty" if len(items) == 1 else f"prompt {k} is empty", param="prompt")
        out.append(ids)
    return out


def _plan(
    body: GenerationFields,
    served: ServedModel,
    settings: ServeSettings,
    kind: str,
    prompts: list[list[int]],
    suffix: list[int] | None,
    chat: bool,
    heals: list[Healing | None] | None = None,
) -> Plan:
    total = len(prompts) * body.n
    if total > settings.max_choices:
        what = f"n = {body.n}" if len(prompts) == 1 else f"{len(prompts)} prompts x n = {body.n}"
        raise bad_request(f"{what} asks for {total} choices; at most {settings.max_choices} are allowed", param="n")
    stops = body.stop_strings
    if body.diffusing and not body.stream:
        raise bad_request("diffusing applies to streaming responses; set stream to true", param="diffusing")
    if suffix and served.attention != AttentionMode.BIDIRECTIONAL:
        raise bad_request(
            f"a suffix (fill-in-the-middle) needs a bidirectional diffusion model; {served.name} is {served.attention}",
            param="suffix",
        )

    tok = served.loaded.tokenizer
    stop_ids = tuple(sorted(tok.stop_ids)) if chat else ()
    ends = set(end_ids(served.loaded.model.config)) | set(stop_ids)
    extra = len(suffix or [])
    longest = max(len(p) for p in prompts) + extra
    room = served.max_len - longest
    param = "messages" if chat else "prompt"
    asked = body.answer_tokens
    if asked is None:
        if room < 1:
            raise bad_request(
                f"the prompt has {longest} tokens, which leaves no room for an answer in the context of "
                f"{served.max_len} tokens", param=param, code="context_length_exceeded")
        asked = min(SETTING["max_new_tokens"].default, room)
    elif asked > room:
        which = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise bad_request(
            f"this model's context is {served.max_len} tokens, but {longest} prompt tokens + {asked} answer "
            f"tokens were requested ({longest + asked})", param=which, code="context_length_exceeded")

    config = _generation_config(body, served, asked, stop_ids)
    base_seed = body.seed if body.seed is not None else random.randrange(0, 2**62)
    choices = []
    for p, ids in enumerate(prompts):
        for i in range(body.n):
            seed = (base_seed + i) % (2**63)
            heal = None if heals is None else heals[p]
            request = EngineRequest(prompt=ids, config=config, suffix=suffix, seed=seed, heal=heal)
            choices.append(Choice(p * body.n + i, request, ends, len(ids) + extra))
    return Plan(
        kind=kind,
        choices=choices,
        stops=stops,
        stream=body.stream,
        diffusing=body.diffusing,
        include_usage=body.include_usage,
        prompt_tokens=sum(len(ids) + extra for ids in prompts),
    )


def _generation_config(body: GenerationFields, served: ServedModel, max_tokens: int,
                       stop_ids: tuple[int, ...]) -> GenerationConfig:
    """The request's decoding settings, with the server's defaults for what it leaves out (the seed
    goes to each choice's engine request, the cache is the engine's)."""
    given = {s.name: getattr(body, s.field) for s in SETTINGS if s.field is not None and s.name != "seed"}
    user, rest = choose({**given, "max_new_tokens": max_tokens})
    fallback = DecodingChoice(policy=DEFAULT_POLICY)
    try:
        settings = resolve(user, served.decoding, fallback, served.loaded.model.config, max_tokens)
    except SettingError as exc:
        raise bad_request(f"{served.name}: {exc}", param=SETTING[exc.setting].field) from None
    settings.pop("cache")
    if rest.get("top_p") == 1.0:
        del rest["top_p"]  # the whole distribution: no filter to run
    try:
        return GenerationConfig(**rest, **settings, stop_ids=stop_ids)
    except UnmaskError as exc:
        raise APIError(400, str(exc)) from None
