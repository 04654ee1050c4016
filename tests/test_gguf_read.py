"""Reading GGUF: tiny files written with gguf-py's own writer in every architecture and tensor type,
and the real SmolLM2-135M file against transformers' independent GGUF loader."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

import unmask
from unmask.decoding import GenerationConfig
from unmask.decoding.ar import ar_generate
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.gguf import load_gguf
from unmask.models.transformer import Transformer

# Largest |dequantised - source| of a tensor, as a fraction of the tensor's largest |value|: half a
# quantisation step of the format (block scale = amax / levels), with a little room for fp16 scales.
ERROR_BOUND = {
    "F32": 0.0, "F16": 1e-3, "BF16": 4e-3, "Q8_0": 0.5 / 127 + 1e-3, "Q5_1": 0.5 / 31 * 2 + 2e-3,
    "Q5_0": 1 / 16 + 2e-3, "Q4_1": 0.5 / 15 * 2 + 2e-3, "Q4_0": 1 / 8 + 2e-3,
}
# llama.cpp's converter interleaves the rotary halves of each Q/K head for these architectures.
PERMUTED = {"llama", "llada"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF converter does to Q/K of llama-arch models (written here from its description)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def source_model(arch: str, tokenizer, d_model: int = 64) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=d_model, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=2 * d_model,
        max_seq_len=128, rope_theta=10000.0, norm_eps=1e-6,
        attention="causal" if arch in ("llama", "qwen2", "qwen3") else "bidirectional",
        shifted=arch != "llada", qkv_bias=arch in ("qwen2", "dream"), qk_norm=arch == "qwen3",
        tie_embeddings=arch != "qwen2", mask_token_id=tokenizer.mask_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )
    model = Transformer(config)
    with torch.no_grad():  # norms away from 1 and non-zero biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.1)
    return model.eval()


def write_gguf(path: Path, arch: str, model: Transformer, tokenizer, qtype: str) -> None:
    """A GGUF file of ``model`` written with gguf-py's writer, names and keys as llama.cpp's converter writes them."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.n_layers)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.d_model)
    w.add_feed_forward_length(c.d_ff)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    if arch in ("dream", "llada"):
        w.add_causal_attention(False)
        w.add_diffusion_shift_logits(arch == "dream")
        w.add_mask_token_id(c.mask_token_id)
    spec = json.loads(tokenizer.backend.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("unmask")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in added else 1 for _, i in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not c.tie_embeddings:
        names["head.weight"] = "output.weight"
    per_layer = {
        "attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
        "attn.q_proj.weight": "attn_q.weight", "attn.k_proj.weight": "attn_k.weight",
        "attn.v_proj.weight": "attn_v.weight", "attn.o_proj.weight": "attn_output.weight",
        "attn.q_proj.bias": "attn_q.bias", "attn.k_proj.bias": "attn_k.bias", "attn.v_proj.bias": "attn_v.bias",
        "attn.q_norm.weight": "attn_q_norm.weight", "attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(c.n_layers):
        names.update({f"layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items() if f"layers.{i}.{k}" in sd})
    for ours, theirs in names.items():
        value = sd[ours]
        if arch in PERMUTED and ".q_proj." in ours:
            value = llama_cpp_permute(value, c.n_heads)
        elif arch in PERMUTED and ".k_proj." in ours:
            value = llama_cpp_permute(value, c.n_kv_heads)
        kind = Q[qtype] if value.ndim == 2 else Q.F32  # llama.cpp keeps norms and biases in F32
        if kind == Q.F32:
            w.add_tensor(theirs, value.astype(np.float32))
        elif kind == Q.F16:
            w.add_tensor(theirs, value.astype(np.float16))
        else:
            w.add_tensor(theirs, quantize(value, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "dream", "llada"])
def test_every_architecture_loads_back_exactly_from_f32(tmp_path, tiny_tokenizer, arch):
    model = source_model(arch, tiny_tokenizer)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, model, tiny_tokenizer, "F32")
    loaded, tokenizer = load_gguf(path)
    c, lc = model.config, loaded.config
    for field in ("attention", "shifted", "qkv_bias", "qk_norm", "tie_embeddings", "n_kv_heads", "d_ff", "eos_token_id"):
        assert getattr(lc, field) == getattr(c, field), field
    assert lc.mask_token_id == (c.mask_token_id if arch in ("dream", "llada") else None)
    ref, got = model.state_dict(), loaded.state_dict()
    assert set(ref) == set(got)
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    ids = torch.tensor([tiny_tokenizer.encode("def fib(n):\n    return n")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=1e-5)
    text = "class Point:\n        x = 12345 <|mask|> ünïcode"
    assert tokenizer.encode(text) == tiny_tokenizer.encode(text)
    assert tokenizer.encode(text, allow_special=True) == tiny_tokenizer.encode(text, allow_special=True)
    assert tokenizer.chat_template == tiny_tokenizer.chat_template


@pytest.mark.parametrize("qtype", sorted(ERROR_BOUND))
def test_tensor_types_dequantise_within_their_bound(tmp_path, tiny_tokenizer, qtype):
    model = source_model("llama", tiny_tokenizer)
    path = tmp_path / f"{qtype}.gguf"
    write_gguf(path, "llama", model, tiny_tokenizer, qtype)
    loaded, _ = load_gguf(path)
    worst = 0.0
    for name, ref in model.state_dict().items():
        got = loaded.state_dict()[name]
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, rel)
        assert rel <= ERROR_BOUND[qtype] if ref.dim() == 2 else rel == 0.0, (name, rel)
    if qtype != "F32":
        assert worst > 0  # the file really was quantised


def test_unknown_architecture_and_tensor_type_are_one_line_errors(tmp_path, tiny_tokenizer):
    model = source_model("llama", tiny_tokenizer)
    bad_arch = tmp_path / "gptj.gguf"
    write_gguf(bad_arch, "gptj", model, tiny_tokenizer, "F32")
    with pytest.raises(UnmaskError, match="unknown architecture 'gptj'"):
        load_gguf(bad_arch)
    bad_type = tmp_path / "tq.gguf"  # a ternary format unmask does not read (its rows must be 256 wide)
    write_gguf(bad_type, "llama", source_model("llama", tiny_tokenizer, d_model=256), tiny_tokenizer, "TQ1_0")
    with pytest.raises(UnmaskError, match="type TQ1_0"):
        load_gguf(bad_type)
    out = subprocess.run([sys.executable, "-m", "unmask", "generate", "--model", str(bad_type), "x"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "type TQ1_0" in out.stderr and "Traceback" not in out.stderr


def test_damaged_file_is_a_one_line_error(tmp_path, tiny_tokenizer):
    path = tmp_path / "cut.gguf"
    write_gguf(path, "llama", source_model("llama", tiny_tokenizer), tiny_tokenizer, "F32")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(UnmaskError, match="cut.gguf"):
        unmask.load(path)


# ------------------------------------------------------------------ the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return unmask.load("smollm2-135m")


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    kwargs = dict(gguf_file=smollm2_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tok


PROMPTS = [
    "def is_prime(n):\n    ",
    "import numpy as np\n\nclass Matrix:\n    def __init__(self, rows):",
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about code.<|im_end|>\n<|im_start|>assistant\n",
]


def test_smollm2_logits_equal_transformers(smollm2, reference):
    """Same dequantised fp32 weights and the same op sequence: agreement to float32 rounding (measured 0.0)."""
    model, _ = reference
    worst = 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2.tokenizer.encode(prompt, allow_special=True)])
        with torch.no_grad():
            ours, theirs = smollm2.model(ids), model(ids).logits
        worst = max(worst, (ours - theirs).abs().max().item())
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    print(f"max |logit difference| over {len(PROMPTS)} prompts: {worst:.3g}")
    assert worst < 1e-3  # logits are O(30); a wrong permutation or norm shows as differences of O(1-20)


def test_smollm2_greedy_continuations_equal_transformers(smollm2, reference):
    model, _ = reference
    prompts = [smollm2.tokenizer.encode(p, allow_special=True) for p in PROMPTS[:2]]
    ours = ar_generate(smollm2.model, prompts, GenerationConfig(max_new_tokens=32, stop_at_eos=False))
    for prompt, seq in zip(prompts, ours.sequences):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert seq == out[0, len(prompt):].tolist()


TEXTS = [
    "def f(x):\n\tif x:\n        return x ** 2  # square\n",
    "    \n\n\n  trailing   spaces   \t\t",
    "naïve café — 日本語のテキスト, emoji 🙂🚀, Ελληνικά",
    "numbers 1234567890 3.14159 1e-10 0xFF",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|><repo_name>unmask<file_sep>src/x.py\n",
    "x=[1,2,3];y={'a':(4,5)}\r\nprint(x[::-1], y)",
]


def test_smollm2_tokenizer_ids_equal_transformers(smollm2, reference):
    _, tok = reference
    for text in TEXTS:
        assert smollm2.tokenizer.encode(text, allow_special=True) == tok(text, add_special_tokens=False).input_ids, text
        assert smollm2.tokenizer.decode(tok(text, add_special_tokens=False).input_ids, skip_special=False) == text


def test_smollm2_special_ids_and_template(smollm2):
    tok = smollm2.tokenizer
    assert tok.eos_id == tok.token_id("<|im_end|>") and tok.token_id("<|endoftext|>") in tok.stop_ids
    ids = tok.encode_chat([{"role": "user", "content": "<|im_end|>"}])
    assert ids.count(tok.token_id("<|im_end|>")) == 2  # the system turn's and the user's; the content stays text
    assert smollm2.model.config.attention == "causal" and smollm2.model.config.tie_embeddings
