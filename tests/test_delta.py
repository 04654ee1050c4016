"""A model stored as its changes over a base: round trip, and a base that is not the one trained from."""

from __future__ import annotations

import torch
import pytest

import unmask
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.delta import BASE_NAME, load_delta, save_delta
from unmask.models.gguf import load_gguf
from unmask.models.io import read_safetensors
from unmask.models.transformer import Transformer

from test_gguf_read import source_model, write_gguf


def test_delta_round_trip_over_a_gguf_base(tmp_path, tiny_tokenizer):
    base_file = tmp_path / "base.gguf"
    write_gguf(base_file, "llama", source_model("llama", tiny_tokenizer), tiny_tokenizer, "F32")
    base, _ = load_gguf(base_file)
    config = ModelConfig(**{**base.config.__dict__, "attention": "block", "block_size": 4, "extra": {}})
    adapted = Transformer(config)
    adapted.load_state_dict(base.state_dict())
    with torch.no_grad():
        adapted.layers[1].mlp.up_proj.weight.add_(0.5)
        adapted.norm.weight.mul_(2)
    record = save_delta(adapted, str(base_file), base_file, base.state_dict(), tmp_path / "adapted", dtype=None)
    assert record["changed"] == ["layers.1.mlp.up_proj.weight", "norm.weight"]
    tiny_tokenizer.save(tmp_path / "adapted")
    loaded = unmask.load(tmp_path / "adapted", device="cpu")
    assert loaded.model.config.attention == "block"
    for k, v in adapted.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    base_file.write_bytes(base_file.read_bytes()[:-4] + b"\0\0\0\1")  # same shapes, another file
    with pytest.raises(UnmaskError, match="not the file it was trained from"):
        load_delta(tmp_path / "adapted")
    (tmp_path / "adapted" / BASE_NAME).write_text("{")
    with pytest.raises(UnmaskError, match="base.json: not valid JSON"):
        unmask.load(tmp_path / "adapted")


def base_and_copy(tmp_path, tokenizer):
    """A tiny llama GGUF base, its model, and a copy of that model to change."""
    base_file = tmp_path / "base.gguf"
    write_gguf(base_file, "llama", source_model("llama", tokenizer), tokenizer, "F32")
    base, _ = load_gguf(base_file)
    adapted = Transformer(ModelConfig(**{**base.config.__dict__, "extra": {}}))
    adapted.load_state_dict(base.state_dict())
    return base_file, base, adapted


def test_low_rank_delta_is_the_truncated_svd(tmp_path, tiny_tokenizer):
    base_file, base, adapted = base_and_copy(tmp_path, tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    w = adapted.layers[0].mlp.gate_proj.weight  # [128, 64]: a rank-3 change, exactly recoverable at rank 4
    change = torch.randn(128, 3, generator=g) @ torch.randn(3, 64, generator=g) * 0.01
    with torch.no_grad():
        w.add_(change)
        adapted.layers[1].attn.o_proj.weight.add_(torch.randn(64, 64, generator=g) * 0.01)  # full rank
    record = save_delta(adapted, str(base_file), base_file, base.state_dict(), tmp_path / "a", dtype=None, rank=4)
    errors = record["truncation_error"]
    assert errors["layers.0.mlp.gate_proj.weight"] < 1e-5 and 0.5 < errors["layers.1.attn.o_proj.weight"] < 1
    tiny_tokenizer.save(tmp_path / "a")
    loaded = unmask.load(tmp_path / "a", device="cpu").model
    torch.testing.assert_close(loaded.layers[0].mlp.gate_proj.weight, w, rtol=0, atol=1e-6)
    kept = loaded.layers[1].attn.o_proj.weight - base.layers[1].attn.o_proj.weight
    full = (adapted.layers[1].attn.o_proj.weight - base.layers[1].attn.o_proj.weight).detach()
    assert torch.linalg.matrix_rank(kept.double(), tol=1e-6) == 4
    assert float(torch.linalg.norm(full - kept) / torch.linalg.norm(full)) == pytest.approx(errors["layers.1.attn.o_proj.weight"], abs=1e-4)


def test_a_half_precision_delta_keeps_its_norms_in_float32(tmp_path, tiny_tokenizer):
    """Factors in float16 round to 11 bits; norms (vectors, tiny) are stored whole in float32."""
    base_file, base, adapted = base_and_copy(tmp_path, tiny_tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = adapted.layers[0].attn.q_proj.weight
        w.add_(torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.01)
        adapted.norm.weight.mul_(1 + 1e-3 * torch.randn(adapted.norm.weight.shape, generator=g))
    for dtype in (torch.float16, torch.bfloat16):
        out = tmp_path / str(dtype)
        save_delta(adapted, str(base_file), base_file, base.state_dict(), out, dtype=dtype, rank=2)
        stored = read_safetensors(out / "delta.safetensors")
        assert stored["norm.weight"].dtype == torch.float32
        assert stored["layers.0.attn.q_proj.weight.delta_a"].dtype == dtype
        tiny_tokenizer.save(out)
        loaded = unmask.load(out, device="cpu").model
        assert torch.equal(loaded.norm.weight, adapted.norm.weight)
        error = float((loaded.layers[0].attn.q_proj.weight - w).abs().max() / (w - base.layers[0].attn.q_proj.weight).abs().max())
        assert error < (2e-3 if dtype == torch.float16 else 1.6e-2), (dtype, error)
