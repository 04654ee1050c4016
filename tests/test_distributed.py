"""torchrun training: 2 gloo processes on CPU take the same steps as one process (DDP and FSDP2, with resume)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unmask.models.io import load_model, read_safetensors
from unmask.models.transformer import Transformer
from unmask.train.metrics import read_metrics
from unmask.train.trainer import run_training

from test_trainer import toml_value

VOCAB = 24
# Float tolerance. Every process draws the same windows and masking noise as the matching
# micro-batch of the single-process run, so the only differences are the order in which
# gradients are summed (within a process, then across processes by all-reduce or
# reduce-scatter) and, for FSDP2, the gradient norm summed shard by shard before clipping:
# float32 roundings of relative size ~1e-7. AdamW divides by sqrt(v), which enlarges relative
# differences in small gradients, so after 4 steps (lr 3e-3) weights differ by up to ~5e-7
# (measured) and losses by ~1e-7. 1e-5 leaves a 20x margin and still catches real mistakes
# (a wrong batch, a missing 1/world scale, a skipped micro-batch): those move losses, gradient
# norms and weights by 1e-3 or more.
ATOL, RTOL = 1e-5, 1e-5


def write_run(directory: Path, out: str, **train) -> Path:
    stream = np.repeat(np.random.default_rng(0).integers(0, 20, size=200), 32).astype(np.uint16)
    np.save(directory / "train.npy", stream)
    np.save(directory / "val.npy", stream[:1000])
    sections = {
        "model": {"vocab_size": VOCAB, "mask_token_id": VOCAB - 1, "d_model": 32, "n_layers": 2, "n_heads": 2, "tie_embeddings": True},
        "data": {"train_tokens": "train.npy", "val_tokens": "val.npy", "seq_len": 16},
        "train": {"steps": 4, "decay_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 1, "eval_every": 2, "eval_batches": 3, "ckpt_every": 2, "log_every": 1,
                  "seed": 3, "device": "cpu", "out_dir": out, **train},
    }
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path = directory / f"{out}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[:6000]


def assert_same_run(reference: Path, other: Path) -> None:
    ref, got = read_metrics(reference / "metrics.jsonl"), read_metrics(other / "metrics.jsonl")
    assert [r["step"] for r in ref] == [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "val_nll"):
        a = [r[key] for r in ref if key in r]
        b = [r[key] for r in got if key in r]
        assert len(a) == len(b) > 0 and np.allclose(a, b, rtol=RTOL, atol=ATOL), (key, a, b)
    wa = read_safetensors(reference / "final" / "model.safetensors")
    wb = read_safetensors(other / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=RTOL, atol=ATOL), name
    # the weights moved far more than the tolerance, so agreeing is not trivial
    config = load_model(reference / "final").config
    torch.manual_seed(3)
    init = Transformer(config).state_dict()
    assert max(float((wa[k] - init[k]).abs().max()) for k in wa) > 100 * ATOL


def distributed_runs(ddp: str, fsdp: str) -> None:
    """Run by each torchrun process (see the bottom of this file): DDP, then FSDP2 stopped and resumed.

    The process group is made once here (gloo cannot be set up twice in one torchrun job);
    each run_training uses it and leaves it in place.
    """
    torch.distributed.init_process_group("gloo")
    run_training(ddp, quiet=True)
    run_training(fsdp, overrides={"train": {"steps": 2}}, quiet=True)
    latest = Path(fsdp).parent / "fsdp" / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step-00000002"
    run_training(fsdp, quiet=True)  # a fresh model and optimizer, filled from the step-2 checkpoint


def test_two_gloo_processes_match_one(tmp_path):
    # 4 micro-batches per step: each process sums 2 of them before the all-reduce, a different
    # summation order from the single process (exact equality would only be luck).
    single = run_training(write_run(tmp_path, "single", grad_accum=4), quiet=True).parent
    ddp, fsdp = write_run(tmp_path, "ddp", grad_accum=4), write_run(tmp_path, "fsdp", grad_accum=4, parallel="fsdp")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    torchrun(launch + [__file__, str(ddp), str(fsdp)], tmp_path)
    assert_same_run(single, tmp_path / "ddp")
    assert_same_run(single, tmp_path / "fsdp")


def test_grad_accum_must_divide_among_processes():
    from unmask.errors import UnmaskError
    from unmask.train.distributed import DistContext, local_micro_batches

    assert local_micro_batches(4, DistContext(rank=1, world=2)) == [1, 3]
    assert local_micro_batches(3, DistContext()) == [0, 1, 2]
    with pytest.raises(UnmaskError, match="multiple"):
        local_micro_batches(3, DistContext(rank=0, world=2))


if __name__ == "__main__":
    distributed_runs(sys.argv[1], sys.argv[2])
