"""LLaDA (LLaDA-8B Base/Instruct, LLaDA-1.5): an OLMo-style config and ``model.transformer.*`` tensors.

The published block is OLMo's "llama" block: pre-norm RMSNorm, separate q/k/v projections, rotary
positions, and the MLP ``ff_out(silu(ff_proj(x)) * up_proj(x))``; bidirectional attention, logits
not shifted, an untied output head ``model.transformer.ff_out``.
"""

from __future__ import annotations

from unmask.models.config import AttentionMode, ModelConfig
from unmask.models.hf.config import HFConfig
from unmask.models.hf.family import Family

PREFIX = "model.transformer."


def model_config(cfg: HFConfig) -> ModelConfig:
    what = "LLaDA"
    cfg.require("block_type", ("llama",), what)
    cfg.require("activation_type", ("silu",), what)
    cfg.require("layer_norm_type", ("rms",), what)
    cfg.require("layer_norm_with_affine", (True,), what)
    cfg.require("bias_for_layer_norm", (False, None), what)
    cfg.require("include_bias", (False,), what)
    cfg.require("rope", (True,), what)
    cfg.require("alibi", (False,), what)
    cfg.require("attention_layer_norm", (False,), what)
    cfg.require("input_emb_norm", (False,), what)
    cfg.require("scale_logits", (False,), what)
    cfg.require("clip_qkv", (None,), what)
    cfg.require("rope_scaling", (None,), what)
    d_model, n_heads = cfg.integer("d_model"), cfg.integer("n_heads")
    n_kv_heads = 1 if cfg.flag("multi_query_attention", False) else cfg.integer("n_kv_heads", n_heads)
    d_ff = cfg.integer("mlp_hidden_size", None)
    if d_ff is None:
        d_ff = cfg.integer("mlp_ratio") * d_model
    vocab = cfg.integer("vocab_size")
    return ModelConfig(
        vocab_size=cfg.integer("embedding_size", vocab),
        d_model=d_model,
        n_layers=cfg.integer("n_layers"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=d_ff,
        max_seq_len=cfg.integer("max_sequence_length", 4096),
        rope_theta=cfg.number("rope_theta", 10000.0),
        norm_eps=cfg.number("rms_norm_eps", 1e-5),
        attention=AttentionMode.BIDIRECTIONAL,
        qkv_bias=cfg.flag("include_qkv_bias", False),
        tie_embeddings=cfg.flag("weight_tying", False),
        shifted=False,
        mask_token_id=cfg.token_id("mask_token_id"),
        eos_token_id=cfg.token_id("eos_token_id"),
        pad_token_id=cfg.token_id("pad_token_id"),
    )


def tensor_names(config: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": f"{PREFIX}wte.weight", "norm.weight": f"{PREFIX}ln_f.weight"}
    if not config.tie_embeddings:
        names["head.weight"] = f"{PREFIX}ff_out.weight"
    block = {
        "attn_norm.weight": "attn_norm.weight",
        "attn.q_proj.weight": "q_proj.weight",
        "attn.k_proj.weight": "k_proj.weight",
        "attn.v_proj.weight": "v_proj.weight",
        "attn.o_proj.weight": "attn_out.weight",
        "mlp_norm.weight": "ff_norm.weight",
        "mlp.gate_proj.weight": "ff_proj.weight",
        "mlp.up_proj.weight": "up_proj.weight",
        "mlp.down_proj.weight": "ff_out.weight",
    }
    if config.qkv_bias:
        block.update({f"attn.{p}_proj.bias": f"{p}_proj.bias" for p in "qkv"})
    for i in range(config.n_layers):
        names.update({f"layers.{i}.{ours}": f"{PREFIX}blocks.{i}.{theirs}" for ours, theirs in block.items()})
    return names


def ignored(name: str, config: ModelConfig) -> bool:
    return config.tie_embeddings and name == f"{PREFIX}ff_out.weight"


LLADA = Family(
    name="llada",
    title="LLaDA",
    model_types=("llada",),
    architectures=("LLaDAModelLM",),
    model_config=model_config,
    tensor_names=tensor_names,
    ignored=ignored,
    mask_tokens=("<|mdm_mask|>",),
    end_of_turn=("<|eot_id|>",),
)
