"""The tokenizer stored in a GGUF file, rebuilt as a ``tokenizers`` byte-level BPE.

GGUF keeps a BPE as ``tokenizer.ggml.tokens`` (byte-level strings, in id order),
``tokenizer.ggml.merges`` ("a b" pairs in rank order), ``tokenizer.ggml.token_type`` (1 normal,
3 control, 4 user-defined, 5 unused, 6 byte) and ``tokenizer.ggml.pre``, the *name* of a
pre-tokeniser that llama.cpp implements as a list of split regexes. ``PRE_TOKENIZERS`` holds the
regexes of the names unmask knows (the same splits llama.cpp applies); each becomes an
"isolated" split, then the byte-level mapping. Control and user-defined tokens become added
tokens (special for control), so ``encode(..., allow_special=True)`` and chat markup find them.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from unmask.errors import UnmaskError
from unmask.tokenizer import SPLIT_PATTERN

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ``tokenizer.ggml.pre`` -> split regexes, applied in order (llama.cpp's names and splits).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (GPT2_SPLIT,),
    "mpt": (GPT2_SPLIT,),
    "olmo": (GPT2_SPLIT,),
    "smollm": (r"\p{N}", GPT2_SPLIT),
    "starcoder": (r"\p{N}", GPT2_SPLIT),
    "refact": (r"\p{N}", GPT2_SPLIT),
    "codeshell": (r"\p{N}", GPT2_SPLIT),
    "llama-bpe": (LLAMA3_SPLIT,),
    "llama3": (LLAMA3_SPLIT,),
    "llama-v3": (LLAMA3_SPLIT,),
    "dbrx": (LLAMA3_SPLIT,),
    "qwen2": (QWEN2_SPLIT,),
    "deepseek-r1-qwen": (QWEN2_SPLIT,),
    "unmask": (SPLIT_PATTERN,),  # unmask's own code tokenizers (llama.cpp does not know this name)
}
CONTROL, USER_DEFINED = 3, 4


def pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
    if name not in PRE_TOKENIZERS:
        raise UnmaskError(f"unknown GGUF pre-tokenizer {name!r} (known: {', '.join(sorted(PRE_TOKENIZERS))})")
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[name]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def bpe_backend(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: str
) -> tokenizers.Tokenizer:
    """A byte-level BPE with ``tokens`` at their ids, ``merges`` in rank order and the added tokens."""
    if token_types and len(token_types) != len(tokens):
        raise UnmaskError(f"GGUF tokenizer: {len(token_types)} token types for {len(tokens)} tokens")
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        raise UnmaskError(f"GGUF tokenizer: {len(tokens) - len(vocab)} duplicate token strings")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise UnmaskError(f"GGUF tokenizer: merge {m!r} is not two tokens separated by a space")
        pairs.append((left, right))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    backend.pre_tokenizer = pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # Already in the vocabulary, so they keep their ids; now matched whole, before the BPE runs.
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(token_types) if t == CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(token_types) if t == USER_DEFINED])
    return backend


def pre_tokenizer_name(backend: tokenizers.Tokenizer) -> str | None:
    """The ``PRE_TOKENIZERS`` name whose splits ``backend`` applies (the inverse of ``pre_tokenizer``), or None."""
    import json

    spec = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    splits = []
    for part in parts:
        if part.get("type") == "Split" and part.get("behavior") == "Isolated" and not part.get("invert"):
            splits.append(part.get("pattern", {}).get("Regex"))
        elif part.get("type") == "ByteLevel":
            if part.get("use_regex", True):
                splits.append(GPT2_SPLIT)
        else:
            return None
    if not parts or parts[-1].get("type") != "ByteLevel":
        return None
    return next((name for name, regexes in PRE_TOKENIZERS.items() if regexes == tuple(splits)), None)
