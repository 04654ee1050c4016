"""The training loop: one process (CPU or one GPU) or many under torchrun, resumable exactly.

``run_training(config)`` reads a TOML config (see ``unmask.train.config``), opens the token
shards (or tokenises ``[data] paths`` once into ``out_dir/data``), builds the model, and runs
AdamW with linear warmup and a cosine decay. Batches and masking noise are pure functions of
(seed, step, micro-step), so a run resumed from a checkpoint logs the same losses as one that
never stopped, and ``torchrun --nproc-per-node N -m unmask train CONFIG`` (DDP, or FSDP2 with
``[train] parallel = "fsdp"``) takes the same steps as one process: see
``unmask.train.distributed``. Only rank 0 logs and writes files. The result is a complete
model directory ``out_dir/final``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from unmask.diffusion.adapt import adapt_loss
from unmask.diffusion.objectives import ar_loss, block_diffusion_loss, compute_loss, diffusion_loss
from unmask.diffusion.schedule import DEFAULT_EPS
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode, ModelConfig
from unmask.models.io import fold_factors
from unmask.models.transformer import Transformer
from unmask.train.build import BuildOptions, build_shards, tokenizer_hash
from unmask.train.checkpoint import gather_model_state, latest_checkpoint, load_checkpoint, save_checkpoint, save_weights
from unmask.train.config import TrainConfig, TrainSection, fingerprint_hash, load_train_config, lora_rank
from unmask.train.corpus import corpus_files
from unmask.train.data import TokenData, TokenWindows, shard_data, step_torch_generator, token_files_data
from unmask.train.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    gradient_sync,
    local_micro_batches,
    setup,
    teardown,
    to_float,
    unwrap,
    wrap_model,
)
from unmask.train.lora import attach, start_from_delta
from unmask.train.metrics import MetricsLog, Progress
from unmask.train.sft import SFTData, build_sft, sft_data, sft_windows
from unmask.train.shards import read_manifest

EVAL_SEED = 1234  # masking noise of validation: fixed so the figure is comparable across evaluations


def _shard_tokenizer(cfg: TrainConfig) -> Any:
    """The tokenizer of a shard directory: ``[data] tokenizer`` if given (it must be the same one), else its copy."""
    from unmask.tokenizer import Tokenizer

    d = cfg.data
    manifest = read_manifest(d.shards)
    recorded = manifest["tokenizer"]
    if d.tokenizer is None and not recorded.get("dir"):
        raise UnmaskError(f"{d.shards}: the shards hold no tokenizer copy; set [data] tokenizer")
    directory = d.tokenizer or str(Path(d.shards) / recorded["dir"])
    tokenizer = Tokenizer.from_dir(directory)
    if tokenizer_hash(tokenizer) != recorded["hash"]:
        raise UnmaskError(f"[data] tokenizer {directory} is not the tokenizer the shards in {d.shards} were made with")
    return tokenizer


def prepare_data(cfg: TrainConfig, ctx: DistContext | None = None) -> tuple[TokenData | SFTData, Any]:
    """The run's token streams and its tokenizer (None when training from token files).

    With ``[data] paths`` the main process tokenises the corpus into a shard directory
    ``out_dir/data`` (reused on the next run when nothing changed) while the others wait.
    """
    ctx = ctx or DistContext()
    d = cfg.data
    if d.train_tokens is not None:
        return token_files_data(d.train_tokens, d.val_tokens), None
    if d.shards is not None:
        return shard_data(d.shards, d.max_tokens), _shard_tokenizer(cfg)
    from unmask.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(d.tokenizer)
    if d.sft is not None:  # examples tokenised once into out_dir/sft by the main process
        if ctx.is_main:
            build_sft(d.sft, cfg.out_dir / "sft", tokenizer, val_path=d.sft_val, val_fraction=d.val_fraction)
        barrier(ctx)
        return sft_data(cfg.out_dir / "sft", d.sft_pad), tokenizer
    if tokenizer.eos_id is None:
        raise UnmaskError(f"{d.tokenizer}: the tokenizer has no EOS token to separate documents")
    root = cfg.out_dir / "data"
    if ctx.is_main:
        files = corpus_files(d.paths, d.suffixes)
        if not files:
            raise UnmaskError(f"[data] paths match no files with suffixes {d.suffixes}")
        options = BuildOptions(val_fraction=d.val_fraction, workers=d.workers, suffixes=tuple(d.suffixes),
                               max_files=d.max_files, progress=False)
        build_shards(d.paths, root, tokenizer, options, files=files)
    barrier(ctx)
    return shard_data(root, d.max_tokens), tokenizer


def build_model_config(cfg: TrainConfig, tokenizer: Any, data: TokenData | SFTData, init: ModelConfig | None = None) -> ModelConfig:
    """[model] completed from the objective and the tokenizer (and the ``init_from`` model's
    shape, which [model] may not change), and checked against them and the data."""
    fields = dict(cfg.model)
    objective = cfg.train.objective
    if init is not None:
        shape = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "qkv_bias", "qk_norm",
                 "tie_embeddings", "rope_theta", "norm_eps")
        for key in shape:
            if key in fields and fields[key] != getattr(init, key):
                raise UnmaskError(f"[model] {key} = {fields[key]!r}, but init_from has {getattr(init, key)!r}")
            fields[key] = getattr(init, key)
        fields.setdefault("max_seq_len", init.max_seq_len)
        if objective == "adapt":
            fields.setdefault("attention", AttentionMode.BLOCK)
    implied = {
        "ar": {"attention": AttentionMode.CAUSAL, "shifted": True},
        "block": {"attention": AttentionMode.BLOCK, "shifted": False},
        "adapt": {"attention": fields.get("attention", AttentionMode.BLOCK), "shifted": True},
    }.get(objective, {"attention": AttentionMode.BIDIRECTIONAL, "shifted": False})
    if objective == "adapt" and implied["attention"] not in (AttentionMode.BLOCK, AttentionMode.BIDIRECTIONAL):
        raise UnmaskError(f"objective 'adapt' trains attention 'block' or 'bidirectional', not {implied['attention']!r}")
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
    if data.max_id >= config.vocab_size:
        raise UnmaskError(f"the training data holds token id {data.max_id}, outside vocab_size {config.vocab_size}")
    return config



def freeze(model: Transformer, trainable: str) -> int:
    """Turn off gradients outside ``trainable`` ("all", "no_embed", "top:N"); returns the trainable count."""
    if trainable != "all":
        top = int(trainable[4:]) if trainable.startswith("top:") else None
        first = None if top is None else max(model.config.n_layers - top, 0)
        for name, p in model.named_parameters():
            if name.startswith(("embed.", "head.")):
                p.requires_grad_(False)
            elif first is not None and name.startswith("layers."):
                p.requires_grad_(int(name.split(".")[1]) >= first)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights that decays matrices only (not norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
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
def evaluate(
    model: torch.nn.Module, objective: str, windows: torch.Tensor, batch_size: int, autocast: Any,
    ctx: DistContext | None = None, sharded: bool = False, prompt_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-token NLL on fixed windows: the ELBO bound with fixed times for diffusion, exact for AR.

    Window j of n gets diffusion time t_j = midpoint of cell j of [eps, 1] (for block diffusion,
    every (window, block) pair gets its own cell), and batch k's masking noise comes from a seed
    of its own, so the figure is deterministic, comparable between evaluations, and the same
    however the batches are dealt to processes (batch k goes to rank k mod world). ``sharded``
    (FSDP2): every process runs the same number of forward passes, idle ones on a batch they drop.
    ``prompt_mask`` (SFT, like ``windows``): the figure is per answer token.
    """
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    device = ctx.device if ctx.enabled else unwrap(model).device
    n, length = windows.shape
    n_blocks = -(-length // unwrap(model).config.block_size)
    n_batches = -(-n // batch_size)
    nll, tokens = 0.0, 0
    for round_start in range(0, n_batches, ctx.world):
        k = round_start + ctx.rank
        if k >= n_batches and not sharded:
            break
        real = k < n_batches
        start = (k if real else 0) * batch_size
        x0 = windows[start : start + batch_size].to(device)
        prompt = None if prompt_mask is None else prompt_mask[start : start + batch_size].to(device)
        rows = torch.arange(start, start + x0.shape[0])
        gen = step_torch_generator(EVAL_SEED, k, 0, stream=2)
        with autocast():
            if objective == "ar":
                out = ar_loss(model, x0, prompt_mask=prompt)
            elif objective == "adapt":
                out = adapt_loss(model, x0, prompt_mask=prompt, generator=gen)
            elif objective == "block":
                cells = (rows[:, None] * n_blocks + torch.arange(n_blocks)[None, :]).flatten()
                t = _grid(cells, n * n_blocks, device).view(-1, n_blocks)
                out = block_diffusion_loss(model, x0, t=t, generator=gen)
            else:
                out = diffusion_loss(model, x0, t=_grid(rows, n, device), prompt_mask=prompt, generator=gen)
        if real:
            nll += float(out.nll_sum)
            tokens += out.n_tokens
    model.train(was_training)
    nll, tokens = all_reduce_sum([nll, float(tokens)], ctx)
    per_token = nll / max(tokens, 1)
    return {"val_nll": per_token, "val_ppl": math.exp(min(per_token, 700.0))}


def _init_model(cfg: TrainConfig, tokenizer: Any) -> Transformer | None:
    """The ``init_from`` model (float32, CPU), its tokenizer checked against the data's."""
    if cfg.train.init_from is None:
        return None
    from unmask.loading import load

    loaded = load(cfg.train.init_from, device="cpu", dtype=torch.float32)
    if tokenizer is not None and loaded.tokenizer.backend.to_str() != tokenizer.backend.to_str():
        raise UnmaskError(f"[train] init_from {cfg.train.init_from}: its tokenizer is not the one the training data was made with")
    return loaded.model


def hardware(device: torch.device, ctx: DistContext | None = None, parallel: str = "ddp") -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info.update(cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    if ctx is not None and ctx.enabled:
        info.update(processes=ctx.world, parallel=parallel)
    return info


def _write_final(
    out_dir: Path, config: ModelConfig, model_state: dict[str, torch.Tensor], tokenizer: Any, section: TrainSection,
    training: dict[str, Any],
) -> Path:
    final = out_dir / "final"
    tmp = out_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = torch.bfloat16 if section.save_dtype == "bfloat16" else torch.float32
    shard = None if section.max_shard_mb is None else int(section.max_shard_mb * 2**20)
    save_weights(tmp, config, model_state, dtype, shard)
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

    Under torchrun every process calls this; all return the final model directory ``out_dir/final``.
    """
    cfg = load_train_config(path, overrides)
    ctx = setup(cfg.train.device)
    try:
        return _train(cfg, ctx, resume, quiet or not ctx.is_main)
    finally:
        teardown(ctx)


def _train(cfg: TrainConfig, ctx: DistContext, resume: bool, quiet: bool) -> Path:
    t = cfg.train
    out_dir = cfg.out_dir
    device = ctx.device
    my_micro_batches = local_micro_batches(t.grad_accum, ctx)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    data, tokenizer = prepare_data(cfg, ctx)
    init = _init_model(cfg, tokenizer)
    model_config = build_model_config(cfg, tokenizer, data, None if init is None else init.config)
    val_windows = val_prompt = None
    if isinstance(data, SFTData):
        train_windows, val = sft_windows(data, tokenizer, cfg.data.seq_len, cfg.data.sft_pad, t.eval_batches * t.batch_size)
        val_windows, val_prompt = val or (None, None)
    else:
        train_windows = TokenWindows(data.train, cfg.data.seq_len, "train")
        if data.val.size:
            val_windows = TokenWindows(data.val, cfg.data.seq_len, "validation").fixed(t.eval_batches * t.batch_size)

    torch.manual_seed(t.seed)
    base = Transformer(model_config).to(device).train()
    teacher = None
    if init is not None:
        base.load_state_dict(init.state_dict())
        if t.distill > 0:
            teacher = init.to(device).eval().requires_grad_(False)
    rank = lora_rank(t.trainable)
    if rank is None:
        n_trainable = freeze(base, t.trainable)
    else:
        n_trainable = attach(base, rank, t.seed)
        if t.init_delta is not None:
            start_from_delta(base, t.init_delta, t.init_from)
    n_params = base.num_params()
    model = wrap_model(base, t.parallel, ctx)
    sharded = ctx.enabled and t.parallel == "fsdp"
    optimizer = make_optimizer(model, cfg)
    fingerprint = {**cfg.resume_fingerprint(), "data": data.fingerprint}
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
    metrics = MetricsLog(out_dir / "metrics.jsonl", keep_through=state["step"] if checkpoint else None) if ctx.is_main else None
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")

    def snapshot(step: int) -> dict[str, Any]:
        return {
            **state,
            "step": step,
            "scheduler": {"kind": "warmup_cosine", "lr": lr_at(step, cfg), "warmup_steps": t.warmup_steps, "decay_steps": cfg.decay_steps},
            "config_hash": fingerprint_hash(fingerprint),
            "fingerprint": fingerprint,
        }

    def validate() -> dict[str, float]:
        eval_model = model if sharded else unwrap(model)
        return evaluate(eval_model, t.objective, val_windows, t.batch_size, autocast, ctx, sharded, val_prompt)

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
            for i, micro in enumerate(my_micro_batches):
                batch = train_windows.batch(t.batch_size, t.seed, step, micro, t.grad_accum)
                x0, prompt = batch if isinstance(batch, tuple) else (batch, None)  # SFT: (ids, prompt mask)
                x0, prompt = x0.to(device), None if prompt is None else prompt.to(device)
                generator = step_torch_generator(t.seed, step, micro, stream=1)
                with gradient_sync(model, sync=i == len(my_micro_batches) - 1):
                    with autocast():
                        if t.objective == "adapt":
                            anneal = 1.0 if t.anneal_steps == 0 else min(1.0, step / t.anneal_steps)
                            out = adapt_loss(model, x0, teacher=teacher, distill=t.distill, anneal=anneal,
                                             prompt_mask=prompt, generator=generator)
                        else:
                            out = compute_loss(t.objective, model, x0, prompt_mask=prompt, generator=generator)
                    (out.loss / len(my_micro_batches)).backward()
                loss_sum += float(out.loss.detach())
            grad_norm = to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = all_reduce_sum([loss_sum], ctx)[0] / t.grad_accum
            done = step + 1
            state["tokens_seen"] += tokens_per_step
            state["wall_time_s"] = wall_before + time.perf_counter() - started
            record: dict[str, Any] = {}
            is_last = done == t.steps
            if val_windows is not None and ((t.eval_every and done % t.eval_every == 0) or is_last):
                record.update(validate())
                state["last_val"] = record["val_ppl"]
                if state["best_val"] is None or record["val_ppl"] < state["best_val"]:
                    state["best_val"] = record["val_ppl"]
            if metrics is not None and (done % t.log_every == 0 or is_last or record):
                now = time.perf_counter()
                rate = (done - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, done
                metrics.write({
                    "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state["tokens_seen"],
                    "tokens_per_s": rate, "model_tflops": 6 * n_params * rate / 1e12, **record,
                })
                progress.note(done, loss, rate, record.get("val_ppl"))
            progress.advance(done, loss)
            if (t.ckpt_every and done % t.ckpt_every == 0) or is_last:
                save_checkpoint(out_dir, done, model, optimizer, snapshot(done), t.keep_checkpoints, ctx.is_main)
                barrier(ctx)

    final_step = max(start_step, t.steps)
    if val_windows is not None and state["last_val"] is None:
        state["last_val"] = validate()["val_ppl"]
    ran = max(state["wall_time_s"] - wall_before, 1e-9)
    rate = (final_step - start_step) * tokens_per_step / ran
    training = {
        "steps": final_step,
        "tokens_seen": state["tokens_seen"],
        "wall_time_s": round(state["wall_time_s"], 2),
        "tokens_per_s": round(rate, 1),
        "model_tflops": round(6 * n_params * rate / 1e12, 4),
        "objective": t.objective,
        "parameters": n_params,
        "trainable_parameters": n_trainable,
        "final_validation": {"metric": "elbo_ppl_bound" if t.objective != "ar" else "ppl", "value": state["last_val"]},
        "best_validation": state["best_val"],
        "data": {k: v for k, v in data.info.items() if k != "source"},
        "hardware": hardware(device, ctx, t.parallel),
        "config": cfg.to_dict(),
    }
    model_state = gather_model_state(model) if sharded else (unwrap(model).state_dict() if ctx.is_main else {})
    if rank is not None and ctx.is_main:  # the final model is the plain one: each W + A @ B as its weight
        model_state = fold_factors(model_state)
    final = out_dir / "final"
    if ctx.is_main:
        metrics.close()
        final = _write_final(out_dir, model_config, model_state, tokenizer, t, training)
    barrier(ctx)
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m unmask.train.trainer CONFIG.toml``: a bare entry point for running a config."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m unmask.train.trainer CONFIG.toml", file=sys.stderr)
        return 2
    try:
        final = run_training(args[0])
    except UnmaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
