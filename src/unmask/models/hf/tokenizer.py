"""The tokenizer of a published checkpoint, with the special ids the decoder and chat need.

- ``tokenizer.json`` when present; Qwen-family checkpoints that ship ``vocab.json`` + ``merges.txt``
  instead (Dream's slow tokenizer) get the same byte-level BPE rebuilt here: NFC, Qwen2's split
  pattern, byte-level pieces, and the added tokens of ``tokenizer_config.json`` at their ids.
- [MASK]: ``config.json``'s ``mask_token_id``, else ``tokenizer_config.json``'s ``mask_token``, else
  the family's mask string (LLaDA ``<|mdm_mask|>``, Dream ``<|mask|>``, Fast-dLLM v2 ``|<MASK>|``,
  SDAR ``<|MASK|>``).
- Stop ids: EOS from ``config.json`` and ``tokenizer_config.json``, the family's end-of-turn token
  (``<|eot_id|>``, ``<|im_end|>``) and ``generation_config.json``'s ``eos_token_id``.
- The chat template comes from ``chat_template.jinja`` or ``tokenizer_config.json`` and renders in
  unmask's sandboxed Jinja environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.hf.family import Family
from unmask.files import check_regular, read_json_object, read_text
from unmask.tokenizer import Tokenizer, backend_from_text

# Qwen2's pre-tokenizer split (contractions, letters, single digits, punctuation, newlines, spaces).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen2_backend(directory: Path, tokenizer_config: dict[str, Any]) -> tokenizers.Tokenizer:
    """Qwen2's byte-level BPE from ``vocab.json`` + ``merges.txt`` and the config's added tokens."""
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    check_regular(vocab)
    check_regular(merges)
    try:
        backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as exc:  # the Rust side raises plain Exceptions for any parse problem
        raise UnmaskError(f"{vocab}: cannot build the BPE with {merges.name} ({str(exc).splitlines()[0]})") from None
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    config_file = directory / "tokenizer_config.json"
    added = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise UnmaskError(f"{config_file}: 'added_tokens_decoder' must be an object")
    for key in sorted(added, key=lambda k: int(k) if str(k).isdigit() else -1):
        entry = added[key]
        if not str(key).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise UnmaskError(f"{config_file}: added token {key!r} must be an id with a 'content' string")
        token = AddedToken(
            entry["content"], single_word=bool(entry.get("single_word")), lstrip=bool(entry.get("lstrip")),
            rstrip=bool(entry.get("rstrip")), normalized=bool(entry.get("normalized")),
            special=bool(entry.get("special", True)),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(entry["content"]) != int(key):
            raise UnmaskError(
                f"{config_file}: added token {entry['content']!r} should have id {key} but lands on "
                f"{backend.token_to_id(entry['content'])} (vocab.json has {len(backend.get_vocab(False))} entries)"
            )
    return backend


def _backend(directory: Path, family: Family, tokenizer_config: dict[str, Any]) -> tokenizers.Tokenizer:
    tok_file = directory / "tokenizer.json"
    if not tok_file.exists() and family.vocab_merges and (directory / "vocab.json").exists():
        return qwen2_backend(directory, tokenizer_config)
    if not tok_file.exists():
        hint = " (or vocab.json + merges.txt)" if family.vocab_merges else ""
        raise UnmaskError(f"{tok_file}: file not found{hint}")
    return backend_from_text(read_text(tok_file), tok_file)


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def load_tokenizer(directory: Path, family: Family, config: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer; fills ``config``'s missing mask/eos/pad ids from it."""
    tokenizer_config = read_json_object(directory / "tokenizer_config.json")
    backend = _backend(directory, family, tokenizer_config)
    mask = config.mask_token_id
    if mask is None:
        names = [_token_string(tokenizer_config.get("mask_token")), *family.mask_tokens]
        mask = next((backend.token_to_id(s) for s in names if s and backend.token_to_id(s) is not None), None)
    if mask is None:
        raise UnmaskError(
            f"{directory / 'config.json'}: no mask_token_id, and the tokenizer has none of {list(family.mask_tokens)}"
        )
    strings = [_token_string(tokenizer_config.get("eos_token")), *family.end_of_turn]
    ids = _ids(config.eos_token_id) + _ids(read_json_object(directory / "generation_config.json").get("eos_token_id"))
    size = backend.get_vocab_size(with_added_tokens=True)
    stop = [backend.token_to_id(s) for s in strings if s and backend.token_to_id(s) is not None]
    stop += [i for i in ids if 0 <= i < size]
    tokenizer = Tokenizer.from_dir(
        directory, backend=backend, mask=mask, eos=config.eos_token_id, pad=config.pad_token_id, stop=stop,
    )
    config.mask_token_id = tokenizer.mask_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_id
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_id
    return tokenizer
