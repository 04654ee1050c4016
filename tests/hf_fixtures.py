"""Tiny random checkpoints written in the exact published layouts of LLaDA, Dream, Fast-dLLM v2 and SDAR.

What is exact: the file names (``config.json``, ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
+ ``model.safetensors.index.json``, ``tokenizer.json`` or Dream's ``vocab.json`` + ``merges.txt``,
``tokenizer_config.json``, ``generation_config.json``, ``chat_template.jinja``), every config key
name, every tensor name, the special-token strings and the chat-template markup. Each directory
also carries ``modeling_*.py`` / ``configuration_*.py`` and an ``auto_map`` like the real ones,
except that these files write a marker when executed, so a test can prove nothing ran.

What is scaled down, and how:
- Shapes: 2 layers, width 48-64, a few heads (GQA where the real model has it), and Qwen3's
  explicit ``head_dim`` that differs from width / heads (as in Qwen3-4B / SDAR-4B).
- Vocabulary: the real special ids (LLaDA mask 126336, EOS 126081, end-of-turn 126348; Dream
  mask 151666, pad 151643; Fast-dLLM v2 mask 151665; SDAR mask 151669) cannot exist in a vocabulary
  of a few hundred. Each fixture trains a byte-level BPE of ``BPE_SIZE`` tokens and appends the
  family's special tokens after it in the real order (``SPECIALS`` lists them with their real ids);
  config.json / tokenizer_config.json / generation_config.json then carry these small ids under
  exactly the keys the real files use. As in the real checkpoints, the embedding has more rows than
  the tokenizer has tokens (``EMBED_ROWS``).
- Block size: Fast-dLLM v2 writes ``bd_size`` 8 (32 in the release) so short test sequences span
  several blocks; SDAR writes no block key, like the release, so its default (4) is used.
- Weights: random, scaled so logits are O(1) and a wrong mapping shows up far above 1e-4.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

FAMILIES = ("llada", "dream", "fast_dllm_v2", "sdar")
BPE_SIZE = 290  # trained tokens (256 bytes + merges) before the special tokens
EMBED_ROWS = 320  # embedding / head rows: more than the tokenizer has, like the published models

# Special tokens in vocabulary order, with the id each has in the published tokenizer.
SPECIALS: dict[str, list[tuple[str, int]]] = {
    "llada": [
        ("<|startoftext|>", 126080), ("<|endoftext|>", 126081), ("[CLS]", 126082), ("[gMASK]", 126083),
        ("<|mdm_mask|>", 126336), ("<|start_header_id|>", 126346), ("<|end_header_id|>", 126347),
        ("<|eot_id|>", 126348),
    ],
    "dream": [
        ("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
        ("<|beginoftext|>", 151665), ("<|mask|>", 151666),
    ],
    "fast_dllm_v2": [
        ("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645), ("|<MASK>|", 151665),
    ],
    "sdar": [
        ("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645), ("<think>", 151667),
        ("</think>", 151668), ("<|MASK|>", 151669),
    ],
}

QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "for i in range(10):\n    print(i * i)\n",
    "Please write a short answer. What is the capital of France? Paris.",
]

LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
DREAM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query_index == messages|length - 1 %}"
    "{%- set ns.last_query_index = index %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and '</think>' in message.content %}"
    "{%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- else %}{%- set content = message.content %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

MARKER = "EXECUTED.marker"
_CODE = (
    "from pathlib import Path\n"
    "Path(__file__).with_name('" + MARKER + "').write_text('this file was executed')\n"
)


# ----------------------------------------------------------------------------------- tokenizers


def train_bpe(qwen: bool) -> tokenizers.Tokenizer:
    """A byte-level BPE of ``BPE_SIZE`` tokens: Qwen2-style (NFC + Qwen split) or GPT-2 style."""
    backend = tokenizers.Tokenizer(models.BPE())
    if qwen:
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_SIZE, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS * 3, trainer=trainer)
    return backend


def _added_tokens_decoder(ids: dict[str, int]) -> dict[str, Any]:
    return {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in ids.items()
    }


# ----------------------------------------------------------------------------------- configs


def llada_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "embedding_dropout": 0.0, "embedding_size": EMBED_ROWS, "eos_token_id": ids["<|endoftext|>"],
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": ids["<|mdm_mask|>"],
        "max_sequence_length": 128, "mlp_hidden_size": 96, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
        "pad_token_id": ids["<|endoftext|>"], "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
        "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False, "vocab_size": EMBED_ROWS,
        "weight_tying": False,
    }


def _qwen_common(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 128, "max_window_layers": 2,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "sliding_window": None, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": EMBED_ROWS,
    }


def dream_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        **_qwen_common(ids), "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "eos_token_id": ids["<|endoftext|>"], "hidden_size": 64, "intermediate_size": 128,
        "mask_token_id": ids["<|mask|>"], "model_type": "Dream", "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "pad_token_id": ids["<|endoftext|>"], "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "transformers_version": "4.46.2", "use_cache": False,
    }


def fast_dllm_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        **_qwen_common(ids), "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration.Fast_dLLM_QwenConfig",
            "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM",
        },
        "bd_size": 8, "eos_token_id": ids["<|im_end|>"], "hidden_size": 64, "intermediate_size": 128,
        "layer_types": ["full_attention", "full_attention"], "model_type": "Fast_dLLM_Qwen",
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "tie_word_embeddings": False, "transformers_version": "4.55.0", "use_cache": True,
    }


def sdar_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        **_qwen_common(ids), "architectures": ["SDARForCausalLM"], "attention_bias": False,
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModel": "modeling_sdar.SDARModel",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "eos_token_id": ids["<|im_end|>"], "head_dim": 16, "hidden_size": 48, "intermediate_size": 96,
        "model_type": "sdar", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "transformers_version": "4.52.4", "use_cache": True,
    }


CONFIGS = {"llada": llada_config, "dream": dream_config, "fast_dllm_v2": fast_dllm_config, "sdar": sdar_config}
CODE_FILES = {
    "llada": ("configuration_llada.py", "modeling_llada.py"),
    "dream": ("configuration_dream.py", "modeling_dream.py", "tokenization_dream.py", "generation_utils.py"),
    "fast_dllm_v2": ("configuration.py", "modeling.py"),
    "sdar": ("configuration_sdar.py", "modeling_sdar.py"),
}


def tokenizer_config(family: str, ids: dict[str, int]) -> dict[str, Any]:
    base = {"added_tokens_decoder": _added_tokens_decoder(ids), "clean_up_tokenization_spaces": False,
            "model_max_length": 131072}
    if family == "llada":
        return {**base, "add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
                "chat_template": LLADA_TEMPLATE, "cls_token": "[CLS]", "eos_token": "<|endoftext|>",
                "fast_tokenizer": True, "gmask_token": "[gMASK]", "pad_token": "<|endoftext|>",
                "tokenizer_class": "PreTrainedTokenizerFast", "trust_remote_code": True}
    if family == "dream":
        return {**base, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
                "bos_token": "<|beginoftext|>", "chat_template": DREAM_TEMPLATE, "eos_token": "<|endoftext|>",
                "errors": "replace", "mask_token": "<|mask|>", "pad_token": "<|endoftext|>",
                "split_special_tokens": False, "tokenizer_class": "DreamTokenizer", "unk_token": None}
    if family == "fast_dllm_v2":
        return {**base, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
                "chat_template": QWEN25_TEMPLATE, "eos_token": "<|im_end|>", "errors": "replace",
                "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None}
    # SDAR's tokenizer has <|MASK|> as an added token but names no mask_token (its pipeline adds it).
    return {**base, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
            "eos_token": "<|im_end|>", "errors": "replace", "pad_token": "<|endoftext|>",
            "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def generation_config(family: str, ids: dict[str, int]) -> dict[str, Any]:
    if family == "llada":
        return {}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]] if family != "dream" else ids["<|endoftext|>"]
    return {"_from_model_config": True, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": eos,
            "pad_token_id": ids["<|endoftext|>"], "transformers_version": "4.46.2"}


# ----------------------------------------------------------------------------------- weights


def hf_tensor_shapes(family: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the published layout with its shape, from config.json alone."""
    if family == "llada":
        d, ff, rows = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
        hd = d // config["n_heads"]
        kv = config["n_kv_heads"] * hd
        p = "model.transformer."
        shapes = {f"{p}wte.weight": (rows, d), f"{p}ln_f.weight": (d,), f"{p}ff_out.weight": (rows, d)}
        for i in range(config["n_layers"]):
            b = f"{p}blocks.{i}."
            shapes.update({
                f"{b}attn_norm.weight": (d,), f"{b}q_proj.weight": (d, d), f"{b}k_proj.weight": (kv, d),
                f"{b}v_proj.weight": (kv, d), f"{b}attn_out.weight": (d, d), f"{b}ff_norm.weight": (d,),
                f"{b}ff_proj.weight": (ff, d), f"{b}up_proj.weight": (ff, d), f"{b}ff_out.weight": (d, ff),
            })
        return shapes
    d, ff, rows = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (rows, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (rows, d)
    for i in range(config["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes.update({
            f"{b}input_layernorm.weight": (d,), f"{b}post_attention_layernorm.weight": (d,),
            f"{b}self_attn.q_proj.weight": (q, d), f"{b}self_attn.k_proj.weight": (kv, d),
            f"{b}self_attn.v_proj.weight": (kv, d), f"{b}self_attn.o_proj.weight": (d, q),
            f"{b}mlp.gate_proj.weight": (ff, d), f"{b}mlp.up_proj.weight": (ff, d), f"{b}mlp.down_proj.weight": (d, ff),
        })
        if family in ("dream", "fast_dllm_v2"):
            shapes.update({f"{b}self_attn.q_proj.bias": (q,), f"{b}self_attn.k_proj.bias": (kv,),
                           f"{b}self_attn.v_proj.bias": (kv,)})
        if family == "sdar":
            shapes.update({f"{b}self_attn.q_norm.weight": (hd,), f"{b}self_attn.k_norm.weight": (hd,)})
    return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Unit-scale activations: embeddings ~N(0, 1), matrices ~N(0, 1/fan_in), norms ~1 +- 0.2, biases ~0.2."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        if len(shape) == 1:
            base = 1.0 if name.endswith("norm.weight") else 0.0
            out[name] = base + 0.2 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name or name.endswith("wte.weight"):
            out[name] = torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
    return out


def write_weights(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """``model.safetensors``, or ``shards`` files and the index, as ``save_pretrained`` writes them."""
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata=meta)
        return
    names = sorted(tensors)
    weight_map, total = {}, 0
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k::shards]}
        save_file(part, directory / file, metadata=meta)
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------- whole checkpoints


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_checkpoint(
    directory: Path,
    family: str,
    *,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer_json: bool | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """A complete tiny checkpoint of ``family`` in ``directory``; returns the directory.

    ``tokenizer_json``: write ``tokenizer.json`` (default for every family but Dream, whose
    release ships ``vocab.json`` + ``merges.txt``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    backend = train_bpe(family != "llada")
    ids = {}
    for token, _ in SPECIALS[family]:
        backend.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
        ids[token] = backend.token_to_id(token)
    config = {**CONFIGS[family](ids), **(config_overrides or {})}
    _write_json(directory / "config.json", config)
    tensors = random_weights(hf_tensor_shapes(family, config), seed)
    write_weights(directory, {k: v.to(dtype) for k, v in tensors.items()}, shards)
    if tokenizer_json if tokenizer_json is not None else family != "dream":
        backend.save(str(directory / "tokenizer.json"))
    else:
        backend.model.save(str(directory))  # vocab.json + merges.txt
    tok_config = tokenizer_config(family, ids)
    if family == "sdar":
        (directory / "chat_template.jinja").write_text(QWEN3_TEMPLATE)
    _write_json(directory / "tokenizer_config.json", tok_config)
    gen = generation_config(family, ids)
    if gen:
        _write_json(directory / "generation_config.json", gen)
    for name in CODE_FILES[family]:
        (directory / name).write_text(_CODE)
    return directory


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def edit_config(directory: Path, drop: Iterable[str] = (), **values: Any) -> None:
    config = read_config(directory)
    for key in drop:
        config.pop(key)
    config.update(values)
    _write_json(directory / "config.json", config)
