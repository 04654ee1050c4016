"""Qwen-based diffusion checkpoints: Dream, Fast-dLLM v2 and SDAR.

All three keep the Qwen tensor layout (``model.embed_tokens``, ``model.layers.N.self_attn.*``,
``input_layernorm``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, ``model.norm``,
``lm_head``) and differ in what the attention sees and where a prediction comes from:

| family | base | attention | logits | extra |
|---|---|---|---|---|
| Dream | Qwen2 | bidirectional | shifted (position i predicts i + 1) | q/k/v biases |
| Fast-dLLM v2 | Qwen2.5 | block-causal, ``bd_size`` | shifted ("token shift") | q/k/v biases |
| SDAR | Qwen3 | block-causal, block 4 unless config.json says | not shifted | per-head q/k RMSNorm, explicit ``head_dim`` |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unmask.models.config import AttentionMode, ModelConfig
from unmask.models.hf.config import HFConfig
from unmask.models.hf.family import Family

SDAR_BLOCK_SIZE = 4  # the block SDAR's chat checkpoints were trained and are decoded with
FAST_DLLM_BLOCK_SIZE = 32  # Fast-dLLM v2's bd_size when config.json omits it


def _common(cfg: HFConfig, what: str, **fields: Any) -> ModelConfig:
    """The Qwen config keys every family shares, plus the family's own ``fields``."""
    cfg.require("hidden_act", ("silu",), what)
    cfg.require("rope_scaling", (None,), what)
    cfg.require("use_sliding_window", (False,), what)
    n_heads = cfg.integer("num_attention_heads")
    return ModelConfig(
        vocab_size=cfg.integer("vocab_size"),
        d_model=cfg.integer("hidden_size"),
        n_layers=cfg.integer("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=cfg.integer("num_key_value_heads", n_heads),
        d_ff=cfg.integer("intermediate_size"),
        max_seq_len=cfg.integer("max_position_embeddings", 32768),
        rope_theta=cfg.number("rope_theta", 10000.0),
        norm_eps=cfg.number("rms_norm_eps", 1e-6),
        tie_embeddings=cfg.flag("tie_word_embeddings", False),
        mask_token_id=cfg.token_id("mask_token_id"),
        eos_token_id=cfg.token_id("eos_token_id"),
        pad_token_id=cfg.token_id("pad_token_id"),
        **fields,
    )


def dream_config(cfg: HFConfig) -> ModelConfig:
    return _common(cfg, "Dream", attention=AttentionMode.BIDIRECTIONAL, shifted=True, qkv_bias=True,
                   head_dim=cfg.integer("head_dim", None))


def fast_dllm_config(cfg: HFConfig) -> ModelConfig:
    return _common(cfg, "Fast-dLLM v2", attention=AttentionMode.BLOCK, shifted=True, qkv_bias=True,
                   block_size=cfg.integer("bd_size", FAST_DLLM_BLOCK_SIZE), head_dim=cfg.integer("head_dim", None))


def sdar_config(cfg: HFConfig) -> ModelConfig:
    cfg.require("attention_bias", (False,), "SDAR")
    block = cfg.integer("block_size", None) or cfg.integer("bd_size", SDAR_BLOCK_SIZE)
    return _common(cfg, "SDAR", attention=AttentionMode.BLOCK, shifted=False, qk_norm=True, block_size=block,
                   head_dim=cfg.integer("head_dim", None))


def tensor_names(config: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    block = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": "post_attention_layernorm.weight",
        "attn.o_proj.weight": "self_attn.o_proj.weight",
        **{f"attn.{p}_proj.weight": f"self_attn.{p}_proj.weight" for p in "qkv"},
        **{f"mlp.{p}_proj.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    }
    if config.qkv_bias:
        block.update({f"attn.{p}_proj.bias": f"self_attn.{p}_proj.bias" for p in "qkv"})
    if config.qk_norm:
        block.update({f"attn.{p}_norm.weight": f"self_attn.{p}_norm.weight" for p in "qk"})
    for i in range(config.n_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in block.items()})
    return names


def ignored(name: str, config: ModelConfig) -> bool:
    """Rotary tables some exports save, and the head of a tied checkpoint."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_embeddings and name == "lm_head.weight")


def _family(name: str, title: str, model_types: tuple[str, ...], architectures: tuple[str, ...],
            model_config: Callable[[HFConfig], ModelConfig], mask_tokens: tuple[str, ...]) -> Family:
    return Family(
        name=name, title=title, model_types=model_types, architectures=architectures,
        model_config=model_config, tensor_names=tensor_names, ignored=ignored,
        mask_tokens=mask_tokens, end_of_turn=("<|im_end|>",), vocab_merges=True,
    )


DREAM = _family("dream", "Dream", ("dream",), ("DreamModel",), dream_config, ("<|mask|>",))
FAST_DLLM = _family(
    "fast_dllm_v2", "Fast-dLLM v2", ("fast_dllm_qwen", "fast_dllm_v2_qwen"),
    ("Fast_dLLM_QwenForCausalLM", "Fast_dLLM_V2_QwenForCausalLM"), fast_dllm_config, ("|<MASK>|",),
)
SDAR = _family("sdar", "SDAR", ("sdar",), ("SDARForCausalLM",), sdar_config, ("<|MASK|>",))
