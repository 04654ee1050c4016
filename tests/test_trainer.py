"""The trainer: exact resume, learning, checkpoints, config errors, a run from source files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import unmask.train.trainer as trainer
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode
from unmask.models.io import load_model, read_safetensors
from unmask.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from unmask.train.config import load_train_config, tomllib
from unmask.train.metrics import read_metrics
from unmask.train.trainer import make_optimizer, run_training

from conftest import CODE

VOCAB = 24
MASK = VOCAB - 1


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_config(directory: Path, sections: dict[str, dict[str, Any]], name: str = "run.toml") -> Path:
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


def cyclic_tokens(directory: Path) -> None:
    """A learnable stream: runs of 32 copies of a random token in 0..19 (a visible neighbour tells the rest)."""
    stream = np.repeat(np.random.default_rng(0).integers(0, 20, size=200), 32).astype(np.uint16)
    np.save(directory / "train.npy", stream)
    np.save(directory / "val.npy", stream[:1000])


def tiny_run(directory: Path, objective: str = "diffusion", **train: Any) -> Path:
    cyclic_tokens(directory)
    model = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 1, "n_heads": 2, "block_size": 8}
    if objective != "ar":
        model["mask_token_id"] = MASK
    settings = {
        "objective": objective, "steps": 12, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3,
        "eval_every": 6, "eval_batches": 2, "ckpt_every": 3, "log_every": 1, "out_dir": "out", "seed": 5,
    }
    settings.update(train)
    data = {"train_tokens": "train.npy", "val_tokens": "val.npy", "seq_len": 16}
    return write_config(directory, {"model": model, "data": data, "train": settings})


def losses(out_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out_dir / "metrics.jsonl")]


@pytest.mark.parametrize("objective", ["diffusion", "block"])
def test_resume_is_exact(tmp_path, monkeypatch, objective):
    calls = []
    original = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = {"steps": 12, "decay_steps": 12, "grad_accum": 2}
    whole = run_training(tiny_run(tmp_path / "a", objective, **settings), quiet=True)
    assert len(calls) == 24
    config_b = tiny_run(tmp_path / "b", objective, **settings)
    run_training(config_b, overrides={"train": {"steps": 7}}, quiet=True)
    # as if the process died after logging step 7 but before its checkpoint was complete
    checkpoints = tmp_path / "b" / "out" / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000007")
    (checkpoints / "latest").write_text("step-00000006\n")
    calls.clear()
    resumed = run_training(config_b, quiet=True)
    assert len(calls) == 2 * (12 - 6)  # started from the step-6 checkpoint, not from scratch

    assert losses(tmp_path / "a" / "out") == losses(tmp_path / "b" / "out")
    assert [s for s, _ in losses(tmp_path / "b" / "out")] == list(range(1, 13))
    wa, wb = read_safetensors(whole / "model.safetensors"), read_safetensors(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_settings(tmp_path):
    config = tiny_run(tmp_path, steps=3)
    run_training(config, quiet=True)
    with pytest.raises(UnmaskError, match="lr"):
        run_training(config, overrides={"train": {"lr": 1e-2, "steps": 6}}, quiet=True)
    run_training(config, overrides={"train": {"lr": 1e-2, "steps": 6}}, resume=False, quiet=True)


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_loss_goes_down(tmp_path, objective):
    config = tiny_run(tmp_path, objective, steps=60, eval_every=20, ckpt_every=0, batch_size=8, lr=1e-2, min_lr=1e-3)
    final = run_training(config, overrides={"model": {"d_model": 64}}, quiet=True)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    vals = [r["val_nll"] for r in records if "val_nll" in r]
    train = [r["loss"] for r in records]
    assert len(vals) == 3
    assert vals[-1] < vals[0] and vals[-1] < 0.6 * np.log(20)  # far below a uniform guess over the 20 tokens in use
    assert np.mean(train[-10:]) < 0.75 * np.mean(train[:10])
    info = json.loads((final / "training.json").read_text())
    assert info["steps"] == 60 and info["tokens_seen"] == 60 * 8 * 16
    assert info["final_validation"]["value"] == pytest.approx(np.exp(vals[-1]))


def test_validation_figure_is_deterministic(tmp_path):
    final = run_training(tiny_run(tmp_path, steps=2), quiet=True)
    model = load_model(final)
    windows = torch.from_numpy(np.load(tmp_path / "val.npy")[:160].astype(np.int64)).view(10, 16)
    first = trainer.evaluate(model, "diffusion", windows, 4, trainer.contextlib.nullcontext)
    second = trainer.evaluate(model, "diffusion", windows, 4, trainer.contextlib.nullcontext)
    assert first == second and np.isfinite(first["val_nll"])


def test_optimizer_state_round_trip(tmp_path):
    cfg = load_train_config(tiny_run(tmp_path))
    data, _ = trainer.prepare_data(cfg)
    model_config = trainer.build_model_config(cfg, None, data)

    def fresh():
        torch.manual_seed(0)
        model = trainer.Transformer(model_config)
        return model, make_optimizer(model, cfg)

    def step(model, optimizer, seed):
        x0 = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(seed))
        trainer.compute_loss("diffusion", model, x0, generator=torch.Generator().manual_seed(seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model, optimizer = fresh()
    for seed in range(3):
        step(model, optimizer, seed)
    save_checkpoint(tmp_path / "out", 3, model, optimizer, {"step": 3}, keep=2)
    other, other_opt = fresh()
    assert load_checkpoint(latest_checkpoint(tmp_path / "out"), other, other_opt) == {"step": 3}
    a, b = optimizer.state_dict(), other_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, entry in a["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["state"][index][name])
    step(model, optimizer, 9)
    step(other, other_opt, 9)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))

    for n in (6, 9):
        save_checkpoint(tmp_path / "out", n, model, optimizer, {"step": n}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["step-00000006", "step-00000009"]
    assert latest_checkpoint(tmp_path / "out").name == "step-00000009"


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("train", "stepz", 10, "stepz"),
        ("model", "d_modle", 32, "d_modle"),
        ("train", "steps", "ten", "steps"),
        ("train", "lr", True, "lr"),
        ("train", "objective", "gan", "objective"),
        ("data", "seq_len", 1.5, "seq_len"),
        ("model", "n_layers", "2", "n_layers"),
        ("model", "attention", "blocky", "one of .*'block'"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, section, key, value, match):
    path = tiny_run(tmp_path)
    with pytest.raises(UnmaskError, match=match):
        load_train_config(path, overrides={section: {key: value}})


@pytest.mark.parametrize("mode", list(AttentionMode))
def test_attention_is_written_by_its_name_in_a_config(tmp_path, mode):
    cfg = load_train_config(tiny_run(tmp_path), overrides={"model": {"attention": mode.value}})
    assert cfg.model["attention"] is mode


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(tmp_path, path):
    """The configs in configs/ parse and pass every check (their data, built by commands, replaced here)."""
    data = tomllib.loads(path.read_text()).get("data", {})
    stand_in = {k: str(tmp_path) for k in ("shards", "tokenizer", "sft", "sft_val", "train_tokens", "val_tokens") if k in data}
    if "paths" in data:
        stand_in["paths"] = [str(tmp_path)]
    cfg = load_train_config(path, overrides={"data": stand_in})
    assert cfg.train.steps > 0 and Path(cfg.train.out_dir).is_absolute()


def test_missing_paths_and_bad_files(tmp_path):
    with pytest.raises(UnmaskError, match="not found"):
        load_train_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1\n")
    with pytest.raises(UnmaskError, match="TOML"):
        load_train_config(bad)
    (tmp_path / "tok").mkdir()
    missing = write_config(tmp_path, {"data": {"paths": ["no/such/dir"], "tokenizer": "tok"}})
    with pytest.raises(UnmaskError, match="no/such/dir"):
        load_train_config(missing)
    with pytest.raises(UnmaskError, match="section"):
        load_train_config(write_config(tmp_path, {"trainer": {"steps": 1}}, "sect.toml"))


def test_run_from_source_files_with_a_tokenizer(tmp_path, tiny_tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"m{i}.py").write_text(CODE[i % len(CODE)] + f"x{i} = {i}\n" * 6)
    tiny_tokenizer.save(tmp_path / "tok")
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2}
    data = {"paths": ["src"], "tokenizer": "tok", "seq_len": 16, "val_fraction": 0.2}
    train = {"steps": 3, "batch_size": 2, "eval_batches": 1, "out_dir": "out", "save_dtype": "bfloat16"}
    config = write_config(tmp_path, {"model": model, "data": data, "train": train})
    final = run_training(config, quiet=True)
    loaded = load_model(final)
    assert loaded.dtype == torch.bfloat16
    assert loaded.config.vocab_size == tiny_tokenizer.vocab_size
    assert loaded.config.mask_token_id == tiny_tokenizer.mask_id
    assert loaded.config.eos_token_id == tiny_tokenizer.eos_id
    assert (final / "tokenizer.json").is_file() and (final / "training.json").is_file()
    manifest = (tmp_path / "out" / "data" / "manifest.json").stat().st_mtime_ns
    run_training(config, overrides={"train": {"steps": 4}}, quiet=True)
    assert (tmp_path / "out" / "data" / "manifest.json").stat().st_mtime_ns == manifest  # cache reused
    with pytest.raises(UnmaskError, match="mask_token_id"):
        run_training(config, overrides={"model": {"mask_token_id": 5}}, resume=False, quiet=True)
