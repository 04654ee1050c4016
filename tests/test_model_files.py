"""Model directories on disk: one safetensors file or size-capped shards with an index, read back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig
from unmask.models.io import INDEX_NAME, WEIGHTS_NAME, load_model, save_model
from unmask.models.transformer import Transformer


def _model(tie: bool = True) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, d_model=32, n_layers=3, n_heads=4, max_seq_len=64, tie_embeddings=tie, mask_token_id=299)
    return Transformer(config).eval()


def _same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("tie", [True, False])
def test_shards_respect_the_cap_and_load_back_exactly(tmp_path: Path, tie: bool) -> None:
    model = _model(tie)
    cap = 20_000
    save_model(model, tmp_path, max_shard_bytes=cap)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / WEIGHTS_NAME).exists()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    biggest_tensor = max(t.numel() * t.element_size() for t in model.state_dict().values())
    for shard in shards:
        # A shard holds several tensors only while they fit under the cap (safetensors adds a small header).
        names = [n for n, f in index["weight_map"].items() if f == shard.name]
        payload = sum(model.state_dict()[n].numel() * 4 for n in names)
        assert payload <= max(cap, biggest_tensor)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for n, t in model.state_dict().items() if not (tie and n == "head.weight")
    )
    loaded = load_model(tmp_path)
    _same_weights(model, loaded)
    ids = torch.randint(0, 299, (2, 10))
    assert torch.equal(model(ids), loaded(ids))


def test_small_models_stay_in_one_file(tmp_path: Path) -> None:
    save_model(_model(), tmp_path, max_shard_bytes=2**30)
    assert (tmp_path / WEIGHTS_NAME).is_file() and not (tmp_path / INDEX_NAME).exists()
    _same_weights(_model(), load_model(tmp_path))


def test_a_missing_shard_is_one_line_naming_it(tmp_path: Path) -> None:
    save_model(_model(), tmp_path, max_shard_bytes=20_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(UnmaskError, match=victim.name):
        load_model(tmp_path)


@pytest.mark.parametrize("which", ["shared", "alone"])
def test_an_index_that_misplaces_a_tensor_is_refused(tmp_path: Path, which: str) -> None:
    save_model(_model(), tmp_path, max_shard_bytes=20_000)
    index_path = tmp_path / INDEX_NAME
    index = json.loads(index_path.read_text())
    files = list(index["weight_map"].values())
    # Move a tensor that shares its shard (the shard then holds a stray) or one alone in its shard
    # (the shard drops out of the index, and the new one lacks the tensor).
    pick = next(n for n, f in index["weight_map"].items() if (files.count(f) > 1) == (which == "shared"))
    index["weight_map"][pick] = next(f for f in files if f != index["weight_map"][pick])
    index_path.write_text(json.dumps(index))
    with pytest.raises(UnmaskError, match=f"{pick}.*{INDEX_NAME}"):
        load_model(tmp_path)


def test_attention_mode_is_one_type_written_by_its_name(tmp_path):
    """Every config holds an AttentionMode, whatever it was built from, and config.json holds its name."""
    from unmask.models.config import AttentionMode, ModelConfig

    for mode in AttentionMode:
        cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, attention=str(mode))
        assert cfg.attention is mode
        cfg.save(tmp_path / "config.json")
        assert json.loads((tmp_path / "config.json").read_text())["attention"] == mode.value
        assert ModelConfig.load(tmp_path / "config.json").attention is mode
