"""A model stored as its changes over a base: round trip, and a base that is not the one trained from."""

from __future__ import annotations

import torch
import pytest

import unmask
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.delta import BASE_NAME, load_delta, save_delta
from unmask.models.gguf import load_gguf
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
    with pytest.raises(UnmaskError, match="unreadable"):
        unmask.load(tmp_path / "adapted")
