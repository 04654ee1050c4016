"""Training checkpoints a kill left half-written or half-deleted are never counted as complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer
from unmask.train.checkpoint import (
    CHECKPOINTS,
    MARKER_NAME,
    OPTIMIZER_NAME,
    STATE_NAME,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    step_name,
)


def model_and_optimizer() -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, mask_token_id=63))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 63, (1, 8))).sum().backward()
    optimizer.step()
    return model, optimizer


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    model, optimizer = model_and_optimizer()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, keep=3)
    return tmp_path


def names(out: Path) -> list[str]:
    return [p.name for p in list_checkpoints(out)]


def ckpt(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / step_name(step)


@pytest.mark.parametrize("victim", ["model.safetensors", OPTIMIZER_NAME, "config.json"])
def test_a_checkpoint_missing_any_file_is_not_complete(run, victim):
    (ckpt(run, 1) / victim).unlink()  # what a kill during pruning leaves: trainer_state.json without the rest
    assert (ckpt(run, 1) / STATE_NAME).is_file()
    assert names(run) == [step_name(2), step_name(3)]


def test_a_truncated_file_is_not_complete(run):
    weights = ckpt(run, 2) / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert names(run) == [step_name(1), step_name(3)]


def test_latest_never_names_an_incomplete_checkpoint(run):
    (ckpt(run, 3) / "model.safetensors").unlink()
    found = latest_checkpoint(run)
    assert found is not None and found.name == step_name(2)
    model, optimizer = model_and_optimizer()
    assert load_checkpoint(found, model, optimizer) == {"step": 2}


def test_pruning_takes_a_checkpoint_out_of_the_list_before_deleting_it(run):
    model, optimizer = model_and_optimizer()
    stale = run / CHECKPOINTS / ".prune-step-00000000-1"  # as a kill during an earlier prune leaves it
    shutil.copytree(ckpt(run, 1), stale)
    save_checkpoint(run, 4, model, optimizer, {"step": 4}, keep=2)
    assert names(run) == [step_name(3), step_name(4)]
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["latest", step_name(3), step_name(4)]


def test_checkpoints_from_before_the_marker_still_count_when_whole(run):
    for step in (1, 2):
        (ckpt(run, step) / MARKER_NAME).unlink()
        marker_free = ckpt(run, step)
        assert marker_free.is_dir()
    os.remove(ckpt(run, 2) / "model.safetensors")
    assert names(run) == [step_name(1), step_name(3)]
    listed = json.loads((ckpt(run, 3) / MARKER_NAME).read_text())["files"]
    assert set(listed) == {"config.json", "model.safetensors", OPTIMIZER_NAME, STATE_NAME}
