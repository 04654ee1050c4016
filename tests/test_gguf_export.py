"""GGUF writing: every architecture round-trips through unmask's own reader (F32 exactly)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unmask.cli import main
from unmask.errors import UnmaskError
from unmask.loading import load
from unmask.models.config import ModelConfig
from unmask.models.gguf import GGUFFile, load_gguf
from unmask.models.gguf.write import export_gguf
from unmask.models.transformer import Transformer

# (attention, shifted, qkv_bias, qk_norm) -> the architecture the file must name
CASES = {
    "llama": ("causal", True, False, False),
    "qwen2": ("causal", True, True, False),
    "qwen3": ("causal", True, False, True),
    "dream": ("bidirectional", True, True, False),
    "llada": ("bidirectional", False, False, False),
    "llada-block": ("block", False, False, False),
}


def tiny(tokenizer, attention: str, shifted: bool, qkv_bias: bool, qk_norm: bool, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
        attention=attention, block_size=8, shifted=shifted, qkv_bias=qkv_bias, qk_norm=qk_norm,
        mask_token_id=tokenizer.mask_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )
    model = Transformer(config).eval()
    with torch.no_grad():  # norms and biases away from their init, so a swapped or dropped one shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_f32_is_exact(tmp_path, tiny_tokenizer, case):
    attention, shifted, qkv_bias, qk_norm = CASES[case]
    model = tiny(tiny_tokenizer, attention, shifted, qkv_bias, qk_norm)
    report = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    assert report.arch == case.split("-")[0]
    file = GGUFFile.open(report.path)
    if attention != "causal":
        assert file.meta[f"{report.arch}.attention.causal"] is False
        assert file.meta["diffusion.shift_logits"] is shifted
        assert file.meta["tokenizer.ggml.mask_token_id"] == tiny_tokenizer.mask_id
    if attention == "block":
        assert file.meta["unmask.attention"] == "block" and file.meta["unmask.block_size"] == 8
        assert any("bidirectionally" in n for n in report.notes)
    back, tok = load_gguf(report.path)
    unused = {} if attention == "block" else {"block_size": model.config.block_size}  # only block models keep it
    assert dataclasses.replace(back.config, extra={}, norm_eps=model.config.norm_eps, **unused) == model.config
    ids = torch.tensor([tiny_tokenizer.encode("def fib(n):\n    return fib(n - 1)\n")])
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    text = "class Point:\n    def __init__(self, x):\n        self.x = x  # 12345 <|endoftext|>\n"
    assert tok.encode(text) == tiny_tokenizer.encode(text)
    assert tok.encode(text, allow_special=True) == tiny_tokenizer.encode(text, allow_special=True)
    assert (tok.eos_id, tok.mask_id, tok.pad_id) == (tiny_tokenizer.eos_id, tiny_tokenizer.mask_id, tiny_tokenizer.pad_id)
    assert tok.stop_ids == tiny_tokenizer.stop_ids and tok.chat_template == tiny_tokenizer.chat_template


@pytest.mark.parametrize("dtype, bound", [("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 1e-2)])
def test_reduced_types_bound_the_weight_error(tmp_path, tiny_tokenizer, dtype, bound):
    model = tiny(tiny_tokenizer, "bidirectional", False, False, False)
    report = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", dtype)
    file = GGUFFile.open(report.path)
    kind = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert file.type_name("blk.0.ffn_up.weight") == kind and file.type_name("blk.0.attn_norm.weight") == "F32"
    back, _ = load_gguf(report.path)
    ours, theirs = model.state_dict(), back.state_dict()
    for name, value in ours.items():
        err = (theirs[name] - value).abs().max().item()
        assert err <= bound * value.abs().max().item(), (name, err)


def test_no_llama_cpp_architecture_is_one_line(tmp_path, tiny_tokenizer):
    model = tiny(tiny_tokenizer, "bidirectional", True, False, True)
    with pytest.raises(UnmaskError, match="no per-head q/k norm"):
        export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf")
    with pytest.raises(UnmaskError, match="unknown GGUF dtype"):
        export_gguf(tiny(tiny_tokenizer, "causal", True, False, False), tiny_tokenizer, tmp_path / "m.gguf", "q4_k")
    assert not (tmp_path / "m.gguf").exists()


def test_export_command_writes_the_default_model(tmp_path, capsys):
    out = tmp_path / "default.gguf"
    assert main(["export", "coder-nano-cpu", "--gguf", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llada, f32" in printed and "tokenise" in printed
    ours, theirs = load("coder-nano-cpu", device="cpu"), load(str(out), device="cpu")
    ids = torch.tensor([ours.tokenizer.encode("def fib(n):")])
    with torch.no_grad():
        assert torch.equal(ours.model(ids), theirs.model(ids))
    assert main(["export", "coder-nano-cpu", "--gguf", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
