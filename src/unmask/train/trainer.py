"""The training loop: one process, CPU or one GPU, resumable exactly from its checkpoints.

``run_training(config)`` reads a TOML config (see ``unmask.train.config``), tokenises the corpus
once (cached under ``out_dir/data``), builds the model, and runs AdamW with linear warmup and a
cosine decay. Batches and masking noise are pure functions of (seed, step, micro-step), so a run
resumed from a checkpoint logs the same losses as one that never stopped. The result is a
complete model directory ``out_dir/final``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmask.diffusion.objectives import ar_loss, block_diffusion_loss, compute_loss, diffusion_loss
from unmask.diffusion.schedule import DEFAULT_EPS
from unmask.errors import UnmaskError
from unmask.loading import resolve_device
from unmask.models.config import ModelConfig
from unmask.models.io import save_model
from unmask.models.transformer import Transformer
from unmask.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from unmask.train.config import TrainConfig, fingerprint_hash, load_train_config
from unmask.train.data import (
    TokenData,
    TokenWindows,
    build_token_cache,
    corpus_files,
    dir_hash,
    files_hash,
    load_token_file,
    step_torch_generator,
)
from unmask.train.metrics import MetricsLog, Progress

EVAL_SEED = 1234  # masking noise of validation: fixed so the figure is comparable across evaluations


def prepare_data(cfg: TrainConfig) -> tuple[TokenData, Any]:
    """The run's token arrays and its tokenizer (None when training from token files)."""
    d = cfg.data
    if d.train_tokens is not None:
        train = load_token_file(d.train_tokens)
        val = load_token_file(d.val_tokens) if d.val_tokens else np.zeros(0, dtype=train.dtype)
        info = {"source": {"train_tokens": d.train_tokens, "val_tokens": d.val_tokens}}
        return TokenData(train, val, {**info, "tokens": {"train": int(train.size), "val": int(val.size)}}), None
    from unmask.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(d.tokenizer)
    if tokenizer.eos_id is None:
        raise UnmaskError(f"{d.tokenizer}: the tokenizer has no EOS token to separate documents")
    files = corpus_files(d.paths, d.suffixes)
    if not files:
        raise UnmaskError(f"[data] paths match no files with suffixes {d.suffixes}")
    key = {
        "tokenizer": dir_hash(d.tokenizer),
        "files": files_hash(files),
        "n_files": len(files),
        "val_fraction": d.val_fraction,
        "max_files": d.max_files,
        "max_tokens": d.max_tokens,
    }
    data = build_token_cache(
        files,
        tokenizer.encode_batch,
        tokenizer.eos_id,
        tokenizer.vocab_size,
        cfg.out_dir / "data",
        source_key=key,
        val_fraction=d.val_fraction,
        max_files=d.max_files,
        max_tokens=d.max_tokens,
    )
    return data, tokenizer


def build_model_config(cfg: TrainConfig, tokenizer: Any, data: TokenData) -> ModelConfig:
    """[model] completed from the objective and the tokenizer, and checked against both and the data."""
    fields = dict(cfg.model)
    objective = cfg.train.objective
    implied = {
        "ar": {"attention": "causal", "shifted": True},
        "block": {"attention": "block", "shifted": False},
    }.get(objective, {"attention": "bidirectional", "shifted": False})
    for key, value in implied.items():
        if key in fields and fields[key] != value:
            raise UnmaskError(f"[model] {key} = {fields[key]!r} does not fit objective {objective!r} (needs {value!r})")
        fields[key] = value
    if tokenizer is not None:
        if fields.setdefault("vocab_size", tokenizer.vocab_size) < tokenizer.vocab_size:
            raise UnmaskError(f"[model] vocab_size {fields['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}")
        for key, value in (("mask_token_id", tokenizer.mask_id), ("eos_token_id", tokenizer.eos_id), ("pad_token_id", tokenizer.pad_id)):
            if key not in fields:
                fields[key] = value
            elif value is not None and fields[key] != value:
                raise UnmaskError(f"[model] {key} = {fields[key]} but the tokenizer says {value}")
    elif "vocab_size" not in fields:
        raise UnmaskError("[model] vocab_size is required when training from token files")
    fields.setdefault("max_seq_len", cfg.data.seq_len)
    config = ModelConfig.from_dict(fields, source=f"{cfg.source} [model]")
    if config.max_seq_len < cfg.data.seq_len:
        raise UnmaskError(f"[model] max_seq_len {config.max_seq_len} is shorter than [data] seq_len {cfg.data.seq_len}")
    if objective != "ar" and config.mask_token_id is None:
        raise UnmaskError(f"objective {objective!r} needs a mask token: set [model] mask_token_id or use a tokenizer with one")
    for name, arr in (("train", data.train), ("val", data.val)):
        if arr.size and int(arr.max()) >= config.vocab_size:
            raise UnmaskError(f"the {name} tokens hold id {int(arr.max())}, outside vocab_size {config.vocab_size}")
    return config


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays matrices only (not norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    t = cfg.train
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), foreach=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine from lr to min_lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, cfg.decay_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def _grid(index: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Midpoints of n equal cells of [eps, 1]: a fixed quadrature of the diffusion time."""
    return (DEFAULT_EPS + (1.0 - DEFAULT_EPS) * (index.double() + 0.5) / n).float().to(device)


@torch.no_grad()
def evaluate(model: Transformer, objective: str, windows: torch.Tensor, batch_size: int, autocast: Any) -> dict[str, float]:
    """Per-token NLL on fixed windows: the ELBO bound with fixed times for diffusion, exact for AR.

    Window j of n gets diffusion time t_j = midpoint of cell j of [eps, 1] (for block diffusion,
    every (window, block) pair gets its own cell), and the masking noise comes from a fixed seed,
    so the figure is deterministic and comparable between evaluations.
    """
    was_training = model.training
    model.eval()
    device = model.device
    n, length = windows.shape
    n_blocks = -(-length // model.config.block_size)
    gen = torch.Generator().manual_seed(EVAL_SEED)
    nll, tokens = 0.0, 0
    for start in range(0, n, batch_size):
        x0 = windows[start : start + batch_size].to(device)
        rows = torch.arange(start, start + x0.shape[0])
        with autocast():
            if objective == "ar":
                out = ar_loss(model, x0)
            elif objective == "block":
                cells = (rows[:, None] * n_blocks + torch.arange(n_blocks)[None, :]).flatten()
                t = _grid(cells, n * n_blocks, device).view(-1, n_blocks)
                out = block_diffusion_loss(model, x0, t=t, generator=gen)
            else:
                out = diffusion_loss(model, x0, t=_grid(rows, n, device), generator=gen)
        nll += float(out.nll_sum)
        tokens += out.n_tokens
    model.train(was_training)
    per_token = nll / max(tokens, 1)
    return {"val_nll": per_token, "val_ppl": math.exp(min(per_token, 700.0))}


def hardware(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    return info


def _write_final(out_dir: Path, model: Transformer, tokenizer: Any, save_dtype: str, training: dict[str, Any]) -> Path:
    final = out_dir / "final"
    tmp = out_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, dtype=torch.bfloat16 if save_dtype == "bfloat16" else torch.float32)
    if tokenizer is not None:
        tokenizer.save(tmp)
    (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def run_training(
    path: str | Path, *, overrides: dict[str, Any] | None = None, resume: bool = True, quiet: bool = False
) -> Path:
    """Train as the config at ``path`` says (resuming from ``latest`` unless ``resume=False``).

    Returns the final model directory ``out_dir/final``.
    """
    cfg = load_train_config(path, overrides)
    t = cfg.train
    out_dir = cfg.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(t.device)
    data, tokenizer = prepare_data(cfg)
    model_config = build_model_config(cfg, tokenizer, data)
    train_windows = TokenWindows(data.train, cfg.data.seq_len, "train")
    val_windows = None
    if data.val.size:
        val_windows = TokenWindows(data.val, cfg.data.seq_len, "validation").fixed(t.eval_batches * t.batch_size)

    torch.manual_seed(t.seed)
    model = Transformer(model_config).to(device).train()
    optimizer = make_optimizer(model, cfg)
    fingerprint = {**cfg.resume_fingerprint(), "data": hashlib.sha256(data.train.tobytes()).hexdigest()[:16]}
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "best_val": None, "last_val": None, "wall_time_s": 0.0}
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        if state.get("config_hash") != fingerprint_hash(fingerprint):
            old = state.get("fingerprint", {})
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise UnmaskError(
                f"{checkpoint}: written with different settings ({', '.join(changed)}); use another out_dir or resume=False"
            )
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    metrics = MetricsLog(out_dir / "metrics.jsonl", keep_through=state["step"] if checkpoint else None)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    params = [p for p in model.parameters()]
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")

    def snapshot(step: int) -> dict[str, Any]:
        return {
            **state,
            "step": step,
            "scheduler": {"kind": "warmup_cosine", "lr": lr_at(step, cfg), "warmup_steps": t.warmup_steps, "decay_steps": cfg.decay_steps},
            "config_hash": fingerprint_hash(fingerprint),
            "fingerprint": fingerprint,
        }

    start_step = state["step"]
    started = time.perf_counter()
    wall_before = state["wall_time_s"]
    last_log_time, last_log_step = started, start_step
    with Progress(total=t.steps, done=start_step, enabled=not quiet) as progress:
        for step in range(start_step, t.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(t.grad_accum):
                x0 = train_windows.batch(t.batch_size, t.seed, step, micro).to(device)
                generator = step_torch_generator(t.seed, step, micro, stream=1)
                with autocast():
                    out = compute_loss(t.objective, model, x0, generator=generator)
                (out.loss / t.grad_accum).backward()
                loss_sum += float(out.loss.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            state["tokens_seen"] += tokens_per_step
            state["wall_time_s"] = wall_before + time.perf_counter() - started
            loss = loss_sum / t.grad_accum
            record: dict[str, Any] = {}
            is_last = done == t.steps
            if val_windows is not None and ((t.eval_every and done % t.eval_every == 0) or is_last):
                record.update(evaluate(model, t.objective, val_windows, t.batch_size, autocast))
                state["last_val"] = record["val_ppl"]
                if state["best_val"] is None or record["val_ppl"] < state["best_val"]:
                    state["best_val"] = record["val_ppl"]
            if done % t.log_every == 0 or is_last or record:
                now = time.perf_counter()
                rate = (done - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, done
                metrics.write(
                    {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens_seen"], "tokens_per_s": rate, **record}
                )
                progress.note(done, loss, rate, record.get("val_ppl"))
            progress.advance(done, loss)
            if (t.ckpt_every and done % t.ckpt_every == 0) or is_last:
                save_checkpoint(out_dir, done, model, optimizer, snapshot(done), t.keep_checkpoints)

    final_step = max(start_step, t.steps)
    if val_windows is not None and state["last_val"] is None:
        state["last_val"] = evaluate(model, t.objective, val_windows, t.batch_size, autocast)["val_ppl"]
    training = {
        "steps": final_step,
        "tokens_seen": state["tokens_seen"],
        "wall_time_s": round(state["wall_time_s"], 2),
        "objective": t.objective,
        "parameters": model.num_params(),
        "final_validation": {"metric": "elbo_ppl_bound" if t.objective != "ar" else "ppl", "value": state["last_val"]},
        "best_validation": state["best_val"],
        "data": {k: v for k, v in data.info.items() if k != "source"},
        "hardware": hardware(device),
        "config": cfg.to_dict(),
    }
    metrics.close()
    return _write_final(out_dir, model, tokenizer, t.save_dtype, training)


def main(argv: list[str] | None = None) -> int:
    """``python -m unmask.train.trainer CONFIG.toml``: a bare entry point for running a config."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m unmask.train.trainer CONFIG.toml", file=sys.stderr)
        return 2
    try:
        print(run_training(args[0]))
    except UnmaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
