"""Reading a GGUF file (llama.cpp's format) into unmask's Transformer and Tokenizer.

The file is memory-mapped (``gguf.GGUFReader``); metadata and tensor headers are checked against
each other before any tensor is dequantised, and each tensor is dequantised once, straight to the
compute dtype (``gguf.quants`` implements every block format). Nothing in the file is executed;
its chat template renders in unmask's sandboxed Jinja.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode, ModelConfig
from unmask.models.gguf.arch import ARCHS, Arch, tensor_names, unpermute
from unmask.models.gguf.vocab import bpe_backend
from unmask.models.io import filled
from unmask.models.transformer import Transformer
from unmask.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"
# Tensor types unmask dequantises (gguf.quants handles them all; the list is what is tested).
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)
# Names that mark a model's end of text or end of turn, added to the stop ids when present.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>")


def is_gguf(path: Path) -> bool:
    """True when ``path`` is a regular file that starts with the GGUF magic."""
    if not path.is_file():  # never open a FIFO or a device: it could block
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass
class GGUFFile:
    """The metadata and tensor headers of an open (memory-mapped) GGUF file."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    @classmethod
    def open(cls, path: str | Path) -> "GGUFFile":
        from gguf import GGUFReader

        path = Path(path)
        if not path.is_file():
            raise UnmaskError(f"{path}: GGUF file not found")
        try:
            reader = GGUFReader(path, "r")
            meta = {k: f.contents() for k, f in reader.fields.items()}
        except Exception as exc:  # gguf-py raises ValueError, struct.error, IndexError ... on damaged files
            raise UnmaskError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        tensors = {t.name: t for t in reader.tensors}
        return cls(path, meta, tensors)

    @property
    def arch(self) -> str:
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise UnmaskError(f"{self.path}: no general.architecture")
        return arch

    def get(self, key: str, default: Any = None, kind: type | tuple[type, ...] = object) -> Any:
        value = self.meta.get(key, default)
        if value is not default and not isinstance(value, kind):
            raise UnmaskError(f"{self.path}: {key} should be {getattr(kind, '__name__', kind)}, got {value!r}")
        return value

    def integer(self, key: str, default: int | None = None) -> int | None:
        value = self.meta.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UnmaskError(f"{self.path}: {key} should be an integer, got {value!r}")
        return value

    def required(self, key: str) -> int:
        value = self.integer(key)
        if value is None:
            raise UnmaskError(f"{self.path}: missing metadata key {key}")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch-order shape of a tensor (GGUF stores the innermost dimension first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def array(self, name: str) -> np.ndarray:
        """One tensor, dequantised to float32, in PyTorch order."""
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise UnmaskError(f"{self.path}: tensor {name} has type {kind}, which unmask cannot read")
        try:
            data = dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:  # a truncated or inconsistent block
            raise UnmaskError(f"{self.path}: cannot dequantise {name} ({kind}: {exc})") from None
        data = np.ascontiguousarray(data, dtype=np.float32).reshape(self.shape(name))
        return data if data.flags.writeable else data.copy()  # F32 tensors come back as the read-only map


def _arch(file: GGUFFile) -> Arch:
    if file.arch not in ARCHS:
        raise UnmaskError(f"{file.path}: unknown architecture {file.arch!r} (unmask reads {', '.join(ARCHS)})")
    return ARCHS[file.arch]


def gguf_config(file: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file describes, its tensor headers checked against it."""
    arch = _arch(file)
    a = arch.name
    if "token_embd.weight" not in file.tensors:
        raise UnmaskError(f"{file.path}: no token_embd.weight tensor")
    vocab, d_model = file.shape("token_embd.weight")
    n_heads = file.required(f"{a}.attention.head_count")
    kv = file.meta.get(f"{a}.attention.head_count_kv", n_heads)
    if isinstance(kv, list):  # per-layer head counts (hybrid models): only uniform ones are supported
        if len(set(kv)) != 1:
            raise UnmaskError(f"{file.path}: per-layer KV head counts {sorted(set(kv))} are not supported")
        kv = kv[0]
    head_dim = file.integer(f"{a}.attention.key_length") or d_model // n_heads
    rope_dim = file.integer(f"{a}.rope.dimension_count") or head_dim
    if rope_dim != head_dim:
        raise UnmaskError(f"{file.path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
    scaling = file.get(f"{a}.rope.scaling.type", "none", str)
    if scaling not in ("none", "linear") or (scaling == "linear" and file.meta.get(f"{a}.rope.scaling.factor", 1.0) != 1.0):
        raise UnmaskError(f"{file.path}: rope scaling {scaling!r} is not supported")
    embedding = file.integer(f"{a}.embedding_length")
    if embedding is not None and embedding != d_model:
        raise UnmaskError(f"{file.path}: {a}.embedding_length {embedding} but token_embd has width {d_model}")
    causal = file.get(f"{a}.attention.causal", arch.attention == AttentionMode.CAUSAL, bool)
    attention = file.get("unmask.attention", AttentionMode.CAUSAL if causal else AttentionMode.BIDIRECTIONAL, str)
    qkv_bias = arch.qkv_bias if arch.qkv_bias is not None else "blk.0.attn_q.bias" in file.tensors
    try:
        config = ModelConfig(
            vocab_size=vocab,
            d_model=d_model,
            n_layers=file.required(f"{a}.block_count"),
            n_heads=n_heads,
            n_kv_heads=kv,
            head_dim=head_dim,
            d_ff=file.required(f"{a}.feed_forward_length"),
            max_seq_len=file.integer(f"{a}.context_length") or 4096,
            rope_theta=float(file.get(f"{a}.rope.freq_base", 10000.0, (int, float))),
            norm_eps=float(file.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6, (int, float))),
            attention=attention,
            block_size=file.integer("unmask.block_size") or 32,
            qkv_bias=qkv_bias,
            qk_norm=arch.qk_norm,
            tie_embeddings="output.weight" not in file.tensors,
            shifted=file.get("diffusion.shift_logits", arch.shifted, bool),
            mask_token_id=file.integer("tokenizer.ggml.mask_token_id"),
            eos_token_id=file.integer("tokenizer.ggml.eos_token_id"),
            pad_token_id=file.integer("tokenizer.ggml.padding_token_id"),
            extra={"source": f"gguf:{a}"},
        )
    except UnmaskError as exc:
        raise UnmaskError(f"{file.path}: {exc}") from None
    _check_tensors(file, config)
    return config


def _check_tensors(file: GGUFFile, config: ModelConfig) -> None:
    """Every tensor the config implies is in the file with the right shape, and nothing else is."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    names = tensor_names(config)
    for ours, theirs in names.items():
        if theirs not in file.tensors:
            raise UnmaskError(f"{file.path}: missing tensor {theirs}")
        if file.shape(theirs) != shapes[ours]:
            raise UnmaskError(
                f"{file.path}: tensor {theirs} has shape {file.shape(theirs)}, the metadata implies {shapes[ours]}"
            )
    stray = sorted(set(file.tensors) - set(names.values()) - {"rope_freqs.weight"})
    if stray:
        raise UnmaskError(f"{file.path}: unexpected tensors {stray[:5]}")
    if "rope_freqs.weight" in file.tensors:
        raise UnmaskError(f"{file.path}: rope_freqs (scaled rotary frequencies) are not supported")


def gguf_state(file: GGUFFile, config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """unmask's state dict from the file: dequantised, cast to ``dtype``, Q/K rows back in rotate-half order."""
    arch = _arch(file)
    state = {}
    for ours, theirs in tensor_names(config).items():
        tensor = torch.from_numpy(file.array(theirs))
        if arch.permuted_qk and ".attn.q_proj." in ours:
            tensor = unpermute(tensor, config.n_heads)
        elif arch.permuted_qk and ".attn.k_proj." in ours:
            tensor = unpermute(tensor, config.n_kv_heads)
        state[ours] = tensor.to(dtype)
    return state


def gguf_tokenizer(file: GGUFFile, config: ModelConfig) -> Tokenizer:
    """The file's tokenizer with its special ids, stop ids and chat template."""
    model = file.get("tokenizer.ggml.model", None, str)
    if model != "gpt2":
        raise UnmaskError(f"{file.path}: tokenizer model {model!r} is not supported (unmask reads byte-level BPE, 'gpt2')")
    tokens = file.get("tokenizer.ggml.tokens", None, list)
    if not tokens:
        raise UnmaskError(f"{file.path}: no tokenizer.ggml.tokens")
    backend = bpe_backend(
        tokens, file.get("tokenizer.ggml.merges", [], list), file.get("tokenizer.ggml.token_type", [], list),
        file.get("unmask.pre_tokenizer", None, str) or file.get("tokenizer.ggml.pre", "gpt-2", str),
    )

    def special(key: str) -> int | None:
        value = file.integer(f"tokenizer.ggml.{key}")
        return value if value is not None and 0 <= value < len(tokens) else None

    stop = [i for i in (special("eos_token_id"), special("eot_token_id"), special("eom_token_id")) if i is not None]
    stop += [backend.token_to_id(t) for t in END_TOKENS if backend.token_to_id(t) is not None]
    try:
        tokenizer = Tokenizer(
            backend, eos=special("eos_token_id"), mask=special("mask_token_id"), pad=special("padding_token_id"),
            bos=special("bos_token_id"), fim_prefix=special("fim_pre_token_id"),
            fim_suffix=special("fim_suf_token_id"), fim_middle=special("fim_mid_token_id"), stop=stop,
            chat_template=file.get("tokenizer.chat_template", None, str),
        )
    except UnmaskError as exc:
        raise UnmaskError(f"{file.path}: {exc}") from None
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_id
    return tokenizer


def load_gguf(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer from a GGUF file (weights dequantised to ``dtype``, float32 by default)."""
    file = GGUFFile.open(path)
    config = gguf_config(file)
    tokenizer = gguf_tokenizer(file, config)
    dtype = dtype or torch.float32
    state = gguf_state(file, config, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    return filled(model, state, str(file.path), device, dtype), tokenizer


def gguf_summary(path: Path) -> dict[str, Any]:
    """Architecture, attention mode and parameter count from the headers, without dequantising."""
    file = GGUFFile.open(path)
    config = gguf_config(file)
    params = sum(int(np.prod(file.shape(n))) for n in file.tensors)
    types = sorted({file.type_name(n) for n in file.tensors})
    return {"family": f"gguf:{file.arch}", "attention": config.attention, "parameters": params, "types": types}
