"""A model's own decoding setting (decoding.json): resolution rules, and CLI and server using it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import unmask
from unmask.decoding import GenerationConfig, decode
from unmask.decoding.defaults import DecodingChoice, read_model_choice, resolve
from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig

from test_cli import assert_one_line_error, run_cli

BIDIRECTIONAL = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, mask_token_id=1)
BLOCK = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, mask_token_id=1, attention="block", block_size=4)


def test_the_commit_rule_comes_whole_from_one_source():
    model = DecodingChoice(policy="threshold", threshold=0.6, cache="prefix", block_size=16)
    default = DecodingChoice(policy="threshold", threshold=0.9)
    assert resolve(DecodingChoice(), model, default, BIDIRECTIONAL, 64) == {
        "policy": "threshold", "threshold": 0.6, "steps": None, "block_size": 16, "cache": "prefix"}
    # the user's steps do not inherit the model's threshold (and keep the model's cache)
    assert resolve(DecodingChoice(steps=8), model, default, BIDIRECTIONAL, 64) == {
        "policy": "confidence", "steps": 8, "block_size": 16, "cache": "prefix"}
    assert resolve(DecodingChoice(threshold=0.5), DecodingChoice(), DecodingChoice(), BIDIRECTIONAL, 64)["policy"] == "threshold"
    per_step = resolve(DecodingChoice(), DecodingChoice(tokens_per_step=4), default, BIDIRECTIONAL, 30)
    assert per_step["steps"] == 8 and per_step["policy"] == "confidence"
    assert resolve(DecodingChoice(), model, default, BLOCK, 64)["block_size"] == 4  # a block model's own block
    with pytest.raises(UnmaskError, match="block_size 4"):
        resolve(DecodingChoice(block_size=8), model, default, BLOCK, 64)
    with pytest.raises(UnmaskError, match="threshold policy"):
        resolve(DecodingChoice(policy="margin", threshold=0.5), model, default, BIDIRECTIONAL, 64)


@pytest.fixture
def model_with_setting(tmp_path: Path, tiny_model_dir: Path) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    (directory / "decoding.json").write_text(json.dumps({"tokens_per_step": 4, "block_size": 16}))
    return directory


def test_generate_uses_the_models_setting_unless_told(model_with_setting: Path):
    proc = run_cli("generate", "--model", str(model_with_setting), "--max-new-tokens", "16", "--no-token-healing", "def f")
    assert proc.returncode == 0 and "NFE 4 " in proc.stderr, proc.stderr
    told = run_cli("generate", "--model", str(model_with_setting), "--max-new-tokens", "16", "--steps", "8",
                   "--no-token-healing", "def f")
    assert told.returncode == 0 and "NFE 8 " in told.stderr, told.stderr
    loaded = unmask.load(model_with_setting, device="cpu")
    ref = decode(loaded.model, [loaded.tokenizer.encode("def f")],
                 GenerationConfig(max_new_tokens=16, steps=4, block_size=16))
    assert proc.stdout.rstrip("\n") == loaded.tokenizer.decode(ref.sequences[0])


def test_a_bad_setting_file_is_one_line(model_with_setting: Path):
    (model_with_setting / "decoding.json").write_text(json.dumps({"policy": "fastest"}))
    with pytest.raises(UnmaskError, match="policy must be one of"):
        read_model_choice(model_with_setting)
    assert_one_line_error(run_cli("generate", "--model", str(model_with_setting), "x"), 1, "decoding.json")
