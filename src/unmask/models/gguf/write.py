"""Writing an unmask model as a GGUF file that llama.cpp runs (``unmask export MODEL --gguf OUT``).

The architecture follows from the model (see ``arch.py``):

| unmask model | ``general.architecture`` | llama.cpp runs it with |
|---|---|---|
| diffusion, shifted logits | ``dream`` | ``llama-diffusion-cli`` |
| diffusion, unshifted logits | ``llada`` (Q/K rows permuted) | ``llama-diffusion-cli`` |
| AR (causal) | ``llama`` (Q/K permuted), ``qwen2`` (q/k/v biases), ``qwen3`` (per-head q/k norm) | ``llama-completion`` |

Block-causal models have no llama.cpp counterpart: the file says ``unmask.attention = block`` and
``unmask.block_size`` (which unmask's reader honours), and llama.cpp runs them bidirectionally.
The tokenizer goes in as ``tokenizer.ggml.*`` (byte-level BPE, ``gpt2``). unmask's own code
tokenizers split text with a regex llama.cpp does not implement; the file names the closest one
llama.cpp knows in ``tokenizer.ggml.pre`` and unmask's own in ``unmask.pre_tokenizer``, so unmask
reads it back exactly while llama.cpp may tokenise some text (indented code) differently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode, ModelConfig
from unmask.models.gguf.arch import ARCHS, Arch, permute, tensor_names
from unmask.models.gguf.vocab import CONTROL, USER_DEFINED, pre_tokenizer_name
from unmask.tokenizer import Tokenizer

NORMAL, UNUSED = 1, 5
# ``--dtype`` -> (gguf tensor type name, general.file_type). 1-D tensors (norms, biases) stay F32.
DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7)}
# Pre-tokenizers llama.cpp does not implement -> the closest one it does. ``smollm`` is GPT-2's split
# with digits one by one; llama.cpp's ``gpt-2`` type would also drop the space before . , ! ? when
# detokenising (``from . import x`` -> ``from. import x``), ``smollm`` keeps text as it is.
LLAMA_CPP_PRE = {"unmask": "smollm"}


@dataclass
class ExportReport:
    """What ``export_gguf`` wrote, and what llama.cpp will do differently from unmask."""

    path: Path
    arch: str
    dtype: str
    tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)  # one line each: how llama.cpp's run will differ


def choose_arch(config: ModelConfig) -> Arch:
    """The llama.cpp architecture that computes what ``config`` computes (attention mode aside for block models)."""
    if config.attention == AttentionMode.CAUSAL:
        if not config.shifted:
            raise UnmaskError("a causal model with unshifted logits has no GGUF architecture")
        if config.qk_norm and config.qkv_bias:
            raise UnmaskError("GGUF export: q/k/v biases together with per-head q/k norm have no llama.cpp architecture")
        name = "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"
    else:
        if config.qk_norm:
            raise UnmaskError("GGUF export: llama.cpp's diffusion architectures (dream, llada) have no per-head q/k norm")
        name = "dream" if config.shifted else "llada"
        if name == "dream" and config.n_heads * config.head_dim != config.d_model:
            raise UnmaskError(
                f"GGUF export: dream needs n_heads * head_dim == d_model, got {config.n_heads} * {config.head_dim} "
                f"!= {config.d_model}"
            )
    return ARCHS[name]


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, unmask's pre-tokenizer name) of a byte-level BPE, padded to ``vocab_size``."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel" or spec.get("normalizer"):
        raise UnmaskError("GGUF export: only byte-level BPE tokenizers without a normalizer can be written")
    pre = pre_tokenizer_name(tokenizer.backend)
    if pre is None:
        raise UnmaskError("GGUF export: the tokenizer's pre-tokenizer is not one GGUF can name")
    tokens: list[str | None] = [None] * vocab_size
    types = [UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if tokenizer.vocab_size > vocab_size:
        raise UnmaskError(f"GGUF export: tokenizer has {tokenizer.vocab_size} tokens, the model only {vocab_size}")
    filled = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return filled, types, merges, pre


def _tensor(value: torch.Tensor, kind: str) -> tuple[np.ndarray, object | None]:
    """(data, raw gguf type or None) for one tensor in PyTorch order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    data = value.detach().to(torch.float32).cpu().numpy()
    if kind == "F32" or data.ndim == 1:
        return np.ascontiguousarray(data), None
    if kind == "F16":
        return data.astype(np.float16), None
    qtype = GGMLQuantizationType[kind]
    return quantize(data, qtype), qtype


def _state(model: torch.nn.Module, arch: Arch, dtype: str) -> tuple[dict[str, tuple[np.ndarray, object | None]], list[str]]:
    config = model.config
    state = model.state_dict()
    kind, notes, out = DTYPES[dtype][0], [], {}
    for ours, theirs in tensor_names(config).items():
        value = state[ours]
        if arch.permuted_qk and ".attn.q_proj." in ours:
            value = permute(value, config.n_heads)
        elif arch.permuted_qk and ".attn.k_proj." in ours:
            value = permute(value, config.n_kv_heads)
        this = kind
        if kind == "Q8_0" and value.shape[-1] % 32:
            this = "F16"
            notes.append(f"{theirs}: rows of {value.shape[-1]} are not a multiple of 32, written as F16")
        out[theirs] = _tensor(value, this)
    return out, notes


def export_gguf(
    model: torch.nn.Module, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32", name: str = "unmask model"
) -> ExportReport:
    """Write ``model`` and ``tokenizer`` to ``path`` as GGUF in the llama.cpp architecture that matches it."""
    from gguf import GGUFWriter

    if dtype not in DTYPES:
        raise UnmaskError(f"unknown GGUF dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    config: ModelConfig = model.config
    arch = choose_arch(config)
    a = arch.name
    if arch.attention == AttentionMode.BIDIRECTIONAL and config.mask_token_id is None and tokenizer.mask_id is None:
        raise UnmaskError("GGUF export: a diffusion model needs a mask token (tokenizer.ggml.mask_token_id)")
    tokens, types, merges, pre = gguf_vocab(tokenizer, config.vocab_size)
    tensors, notes = _state(model, arch, dtype)
    path = Path(path)
    if path.is_dir():
        raise UnmaskError(f"{path} is a directory; give the .gguf file to write")
    if config.attention == AttentionMode.BLOCK:
        notes.append(
            f"block-causal model (block {config.block_size}): llama.cpp has no block-causal attention and will run "
            "it bidirectionally; unmask reads unmask.attention and runs it as trained"
        )
    if config.usable_vocab is not None and config.usable_vocab < config.vocab_size:
        notes.append(f"ids >= {config.usable_vocab} are padding: unmask never predicts them, llama.cpp may")
    if arch.attention == AttentionMode.BIDIRECTIONAL:
        notes.append("llama.cpp does not rule out [MASK] as a prediction; unmask does")
    llama_pre = LLAMA_CPP_PRE.get(pre, pre)
    if llama_pre != pre:
        notes.append(
            f"llama.cpp has no {pre!r} pre-tokenizer: the file names {llama_pre!r}, so llama.cpp may split some text "
            "(e.g. indented code) into different tokens; unmask reads unmask.pre_tokenizer and tokenises as before"
        )

    tmp = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = GGUFWriter(tmp, a)
        writer.add_name(name)
        writer.add_file_type(DTYPES[dtype][1])
        if dtype == "q8_0":
            writer.add_quantization_version(2)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.d_model)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.n_kv_heads)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        if arch.attention == AttentionMode.BIDIRECTIONAL:
            writer.add_causal_attention(False)
            writer.add_diffusion_shift_logits(config.shifted)
        if config.attention == AttentionMode.BLOCK:
            writer.add_string("unmask.attention", AttentionMode.BLOCK)
            writer.add_uint32("unmask.block_size", config.block_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(llama_pre)
        if llama_pre != pre:
            writer.add_string("unmask.pre_tokenizer", pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        specials = {
            "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "padding": tokenizer.pad_id,
            "mask": config.mask_token_id if config.mask_token_id is not None else tokenizer.mask_id,
            "fim_pre": tokenizer.fim_prefix_id, "fim_suf": tokenizer.fim_suffix_id, "fim_mid": tokenizer.fim_middle_id,
        }
        ends = sorted(set(tokenizer.stop_ids) - {tokenizer.eos_id})
        if ends:
            specials["eot"] = ends[0]
        for key, value in specials.items():
            if value is not None:
                writer.add_uint32(f"tokenizer.ggml.{key}_token_id", value)
        writer.add_add_bos_token(False)  # unmask's encode adds no BOS; llama.cpp then adds none either
        writer.add_add_eos_token(False)
        writer.add_chat_template(tokenizer.chat_template)
        for tensor_name, (data, raw) in tensors.items():
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UnmaskError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return ExportReport(path, a, dtype, len(tensors), path.stat().st_size, notes)


def export_model(model: str | None, out: str | Path, dtype: str = "f32") -> list[str]:
    """``unmask export``: load ``model`` (any name ``unmask.load`` takes) in float32 on the CPU, write it; report lines."""
    from unmask.loading import load

    loaded = load(model, device="cpu", dtype=torch.float32)
    report = export_gguf(loaded.model, loaded.tokenizer, out, dtype, name=loaded.path.name)
    lines = [f"wrote {report.path}: {report.arch}, {report.dtype}, {report.tensors} tensors, {report.bytes / 1e6:.1f} MB"]
    return lines + [f"note: {n}" for n in report.notes]
