"""Text <-> token ids: a byte-level BPE tokenizer, its special tokens and a sandboxed chat template.

Design:
- The BPE itself is the `tokenizers` library; this module only chooses the pre-tokenizer, fixes the
  special tokens and wraps the result in a small `Tokenizer` class that the rest of unmask uses.
- Byte level: every one of the 256 bytes is in the vocabulary, so any Unicode string encodes and
  `decode(encode(s)) == s`. No normalizer runs (it would break that round trip).
- Code-friendly pre-tokenizer: runs of spaces/tabs and runs of newlines are pieces of their own, so
  4 or 8 spaces of indentation can be learned as one token; a word takes at most one leading space
  (" return"), digits come in groups of at most three.
- Special tokens are added first, so a trained tokenizer has them at ids 0..7 (`SPECIAL_TOKENS`).
- `encode` never turns special-token strings found in text into special ids: `"<|mask|>"` typed by a
  user is ordinary text. Only `encode(..., allow_special=True)` and `encode_chat` (for the template's
  own markup, never message contents) produce special ids.
- `pieces(ids)` gives the text each token contributes, for live views of a canvas that is being
  filled in: a UTF-8 character split over several tokens belongs to the token that completes it.
- Published checkpoints bring their own `tokenizer.json`; `Tokenizer.from_dir` reads it with an
  HF-style `tokenizer_config.json`, and explicit keyword arguments (strings or ids) override or
  supply the special tokens (e.g. LLaDA: `mask=126336, eos=126081, stop=[126348]`).
- Chat templates run in Jinja's `ImmutableSandboxedEnvironment` with bounds on `*`, `**` and the
  output (`unmask.chat_template`); any template error, including an attempt to reach Python
  internals, becomes an `UnmaskError`. The server renders in a worker process it can kill
  (`encode_chat(..., render=...)`).
- Files of a model directory are read with `read_file` / `read_json_object`: regular files only
  (never a FIFO or a device, which could block for ever), capped in size, one-line errors.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from unmask import chat_template as templates
from unmask.errors import UnmaskError
from unmask.files import read_json_object, read_text

EOS, MASK, PAD = "<|endoftext|>", "<|mask|>", "<|pad|>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Order fixes the ids of a trained tokenizer: <|endoftext|> = 0, <|mask|> = 1, ... <|im_end|> = 7.
SPECIAL_TOKENS = (EOS, MASK, PAD, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, IM_START, IM_END)

# Contractions | word with at most one leading space | 1-3 digits with at most one leading space |
# punctuation run with at most one leading space | newline run with the next line's indentation |
# space/tab run | any other whitespace character. Keeping a newline and the indentation after it
# together lets BPE learn "\n    " and "\n        " as single tokens, which halves code length.
SPLIT_PATTERN = (
    r"'(?i:[sdmt]|ll|ve|re)"
    r"| ?[\p{L}\p{M}]+"
    r"| ?\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+"
    r"|[\r\n]+[^\S\r\n]*"
    r"|[^\S\r\n]+"
    r"|\s"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TokenRef = Union[str, int]  # a special token given by its text or by its id
# (template source, messages, add_generation_prompt, template variables) -> rendered text
Renderer = Callable[[str, list, bool, dict], str]
MAX_TEMPLATE_BYTES = 1 << 20  # largest chat_template.jinja read from a model directory


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`, with `SPECIAL_TOKENS` at ids 0..7 and ChatML."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise UnmaskError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {floor}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(
        backend, eos=EOS, mask=MASK, pad=PAD, fim_prefix=FIM_PREFIX, fim_suffix=FIM_SUFFIX,
        fim_middle=FIM_MIDDLE, stop=[IM_END], chat_template=CHATML_TEMPLATE,
    )


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte -> printable character map used by byte-level BPE (GPT-2 convention)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_DECODER = _byte_decoder()
# Stand-ins for message contents while encode_chat renders (private-use characters).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK_RE = re.compile(f"{_MARK_OPEN}([0-9]+){_MARK_CLOSE}")
_ROLE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")
# Config keys for the named special tokens; the first four are HF's, the fim ones are ours.
_CONFIG_KEYS = {
    "eos": "eos_token", "mask": "mask_token", "pad": "pad_token", "bos": "bos_token",
    "fim_prefix": "fim_prefix_token", "fim_suffix": "fim_suffix_token", "fim_middle": "fim_middle_token",
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus named special tokens, stop tokens and a chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos: TokenRef | None = None,
        mask: TokenRef | None = None,
        pad: TokenRef | None = None,
        bos: TokenRef | None = None,
        fim_prefix: TokenRef | None = None,
        fim_suffix: TokenRef | None = None,
        fim_middle: TokenRef | None = None,
        stop: Iterable[TokenRef] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.backend.encode_special_tokens = False
        # A second copy reads special-token strings as text, so neither encode mode mutates shared
        # state (safe across threads).
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        named = dict(eos=eos, mask=mask, pad=pad, bos=bos, fim_prefix=fim_prefix,
                     fim_suffix=fim_suffix, fim_middle=fim_middle)
        self._ids = {name: self._resolve(ref, name) for name, ref in named.items()}
        self.stop_ids: set[int] = {self._resolve(ref, "stop") for ref in stop}
        if self._ids["eos"] is not None:
            self.stop_ids.add(self._ids["eos"])
        added = backend.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, tok in added.items() if tok.special}
        self.special_ids |= {i for i in self._ids.values() if i is not None} | self.stop_ids
        self._added_text = {i: tok.content for i, tok in added.items()}
        self._bytes_cache: dict[int, bytes] = {}
        self.chat_template = chat_template if chat_template is not None else CHATML_TEMPLATE
        self._template = templates.compile_template(self.chat_template)

    def _resolve(self, ref: TokenRef | None, name: str) -> int | None:
        if ref is None:
            return None
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise UnmaskError(f"special token {name!r} must be a string or an id, got {ref!r}")
        if isinstance(ref, int):
            if not 0 <= ref < self.vocab_size:
                raise UnmaskError(
                    f"special token {name!r} id {ref} is outside the vocabulary (size {self.vocab_size})"
                )
            return ref
        token_id = self.backend.token_to_id(ref)
        if token_id is None:
            raise UnmaskError(f"special token {name!r} = {ref!r} is not in the vocabulary")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path, backend: tokenizers.Tokenizer | None = None, **overrides: Any) -> Tokenizer:
        """Load `tokenizer.json` (+ optional `tokenizer_config.json`) from `path`.

        Keyword arguments (`eos`, `mask`, `pad`, `bos`, `fim_*`, `stop`, `chat_template`) override the
        config; unnamed specials fall back to unmask's own token strings when the vocabulary has them.
        `backend` replaces `tokenizer.json` (a checkpoint that ships `vocab.json` + `merges.txt`).
        """
        root = Path(path)
        if not root.is_dir():
            raise UnmaskError(f"tokenizer directory not found: {root}")
        if backend is None:
            backend = _read_backend(root / "tokenizer.json")
        config = read_json_object(root / "tokenizer_config.json")
        kwargs: dict[str, Any] = {}
        defaults = {"eos": EOS, "mask": MASK, "pad": PAD, "fim_prefix": FIM_PREFIX,
                    "fim_suffix": FIM_SUFFIX, "fim_middle": FIM_MIDDLE}
        for name, key in _CONFIG_KEYS.items():
            value = _token_text(config.get(key), root / "tokenizer_config.json", key)
            if value is None and name in defaults and backend.token_to_id(defaults[name]) is not None:
                value = defaults[name]
            kwargs[name] = value
        stop = config.get("stop_tokens")
        if stop is None:
            stop = [IM_END] if backend.token_to_id(IM_END) is not None else []
        if not isinstance(stop, list):
            raise UnmaskError(f"{root / 'tokenizer_config.json'}: 'stop_tokens' must be a list")
        kwargs["stop"] = [_token_text(s, root / "tokenizer_config.json", "stop_tokens") for s in stop]
        kwargs["chat_template"] = _chat_template(config, root)
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(backend, **kwargs)
        except UnmaskError as e:
            raise UnmaskError(f"{root}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (special tokens, stop tokens, template)."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(root / "tokenizer.json"))
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name, key in _CONFIG_KEYS.items():
            token_id = self._ids[name]
            config[key] = None if token_id is None else self.backend.id_to_token(token_id)
        config["stop_tokens"] = [self.backend.id_to_token(i) for i in sorted(self.stop_ids)]
        config["chat_template"] = self.chat_template
        (root / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (a model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self._ids["eos"]

    @property
    def mask_id(self) -> int | None:
        return self._ids["mask"]

    @property
    def pad_id(self) -> int | None:
        return self._ids["pad"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos"]

    @property
    def fim_prefix_id(self) -> int | None:
        return self._ids["fim_prefix"]

    @property
    def fim_suffix_id(self) -> int | None:
        return self._ids["fim_suffix"]

    @property
    def fim_middle_id(self) -> int | None:
        return self._ids["fim_middle"]

    def token_id(self, token: str) -> int | None:
        """The id of a token string (e.g. a special token), or None if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings stay plain text unless `allow_special`."""
        backend = self.backend if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust backend)."""
        backend = self.backend if allow_special else self._plain
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut-off character) becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (an added token: its text in UTF-8)."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_text:
            data = self._added_text[token_id].encode("utf-8")
        else:
            piece = self.backend.id_to_token(token_id)
            if piece is None:
                raise UnmaskError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
            try:
                data = bytes(_BYTE_DECODER[c] for c in piece)
            except KeyError:  # not a byte-level token: fall back to the backend's own decoding
                data = self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")
        self._bytes_cache[token_id] = data
        return data

    def pieces(self, ids: Iterable[int], skip_special: bool = True) -> list[str]:
        """The text each token contributes; `"".join(pieces(ids)) == decode(ids)`.

        A character whose UTF-8 bytes span several tokens goes to the token that completes it; the
        earlier ones get "". Skipped special tokens get "" and do not interrupt a pending character.
        """
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = []
        for i in ids:
            i = int(i)
            if skip_special and i in self.special_ids:
                out.append("")
                continue
            out.append(decoder.decode(self.token_bytes(i)))
        tail = decoder.decode(b"", final=True)
        if tail:
            out[-1] += tail
        return out

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            render: Renderer | None = None) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the sandboxed chat template.

        `render` replaces the in-process rendering (the server passes one that runs in a worker
        process with a deadline)."""
        _check_messages(messages)
        return self._render(messages, add_generation_prompt, render)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    render: Renderer | None = None) -> list[int]:
        """Ids of the rendered chat: the template's markup may be special tokens, message contents never.

        Each content is rendered as a marker; the template text between markers is encoded with
        specials allowed and each content without. Templates that transform a content (e.g.
        `| trim`) see the marker, so such transforms are not applied.
        """
        _check_messages(messages)
        marked = [{**m, "content": f"{_MARK_OPEN}{k}{_MARK_CLOSE}"} for k, m in enumerate(messages)]
        parts = _MARK_RE.split(self._render(marked, add_generation_prompt, render))
        ids: list[int] = []
        for k, part in enumerate(parts):  # template text and message indices alternate
            if k % 2 and int(part) >= len(messages):
                raise UnmaskError("chat template produced a message marker of its own")
            ids += self.encode(messages[int(part)]["content"]) if k % 2 else self.encode(part, allow_special=True)
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool, render: Renderer | None = None) -> str:
        names = {name: (None if i is None else self.backend.id_to_token(i)) for name, i in self._ids.items()}
        variables = templates.render_kwargs(names)
        if render is not None:
            return render(self.chat_template, messages, add_generation_prompt, variables)
        return templates.render(self._template, messages, add_generation_prompt, variables)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise UnmaskError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise UnmaskError(f"message {k} must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise UnmaskError(f"message {k} has no {key!r}")
            if not isinstance(m[key], str):
                raise UnmaskError(f"message {k} {key!r} must be a string, got {type(m[key]).__name__}")
        if not _ROLE_RE.fullmatch(m["role"]):  # roles are template markup: no special tokens in them
            raise UnmaskError(f"message {k} role {m['role'][:40]!r} must be a short word like 'user'")


def _read_backend(tok_file: Path) -> tokenizers.Tokenizer:
    if not os.path.lexists(tok_file):
        raise UnmaskError(f"missing {tok_file}")
    return backend_from_text(read_text(tok_file), tok_file)


def backend_from_text(text: str, tok_file: Path) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` from the text of a `tokenizer.json`; a bad file is a one-line error."""
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exceptions for any parse problem
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnmaskError(f"cannot read {tok_file}: {reason}") from None


def _token_text(value: Any, file: Path, key: str) -> str | None:
    """A special token from an HF config: a string, a dict with "content", or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UnmaskError(f"{file}: {key!r} must be a string or a dict with 'content', got {value!r}")


def _chat_template(config: dict[str, Any], root: Path) -> str | None:
    """The chat template: `chat_template.jinja`, else the config's string or its "default" entry."""
    jinja_file = root / "chat_template.jinja"
    if os.path.lexists(jinja_file):
        return read_text(jinja_file, MAX_TEMPLATE_BYTES)
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        for entry in template:
            if isinstance(entry, dict) and entry.get("name") == "default":
                if isinstance(entry.get("template"), str):
                    return entry["template"]
    raise UnmaskError(
        f"{root / 'tokenizer_config.json'}: 'chat_template' must be a string or a list with a 'default' entry"
    )
