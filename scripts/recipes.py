"""Which adaptation recipe moves furthest per CPU-hour: each one from the same base, data and windows.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/recipes.py --config configs/smollm2-coder.toml --steps 12 \
        --json runs/recipes/summary.json

Every recipe is the config with a few [train] keys replaced (what trains, the distillation weight,
the learning rate) and runs ``--steps`` optimizer steps from the base with the same batches and
masking noise. Before any step and after the last, the trainer's own validation (the ELBO bound
per token on the same fixed held-out windows, with fixed masking) is taken, so each recipe's drop
in bound per CPU-hour (training time x threads; loading left out) is comparable. Early steps only: the ranking of the
first ten thousand tokens need not hold for a million.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from unmask.models.transformer import Transformer
from unmask.train.config import load_train_config
from unmask.train.data import TokenWindows
from unmask.train.metrics import read_metrics
from unmask.train.trainer import _init_model, build_model_config, evaluate, prepare_data, run_training

RECIPES = {  # every block but the embedding / the last 6 blocks / rank-80 factors; KL weight; peak lr
    "full-distill": {"trainable": "no_embed", "distill": 0.5, "lr": 1e-4},
    "full-ce": {"trainable": "no_embed", "distill": 0.0, "lr": 1e-4},
    "top6-distill": {"trainable": "top:6", "distill": 0.5, "lr": 1e-4},
    "lora80-distill": {"trainable": "lora:80", "distill": 0.5, "lr": 5e-4},
}


def start_bound(config: Path, eval_batches: int) -> float:
    """The validation bound of the base itself, read as the adapted model (step 0 of every recipe)."""
    cfg = load_train_config(config, {"train": {"eval_batches": eval_batches}})
    data, tokenizer = prepare_data(cfg)
    init = _init_model(cfg, tokenizer)
    model = Transformer(build_model_config(cfg, tokenizer, data, init.config))
    model.load_state_dict(init.state_dict())
    windows = TokenWindows(data.val, cfg.data.seq_len, "validation").fixed(eval_batches * cfg.train.batch_size)
    return evaluate(model, cfg.train.objective, windows, cfg.train.batch_size, contextlib.nullcontext)["val_nll"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2-coder.toml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--recipes", help=f"comma-separated subset of: {', '.join(RECIPES)}", default=None)
    parser.add_argument("--out", default="runs/recipes", help="scratch directory (each run's checkpoints are removed)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    names = list(RECIPES) if args.recipes is None else [n.strip() for n in args.recipes.split(",")]
    threads = torch.get_num_threads()
    out = Path(args.out)
    started = time.perf_counter()
    before = start_bound(Path(args.config), args.eval_batches)
    print(f"step 0 (the base as the adapted model): bound {before:.3f} nats/token ({time.perf_counter() - started:.0f} s)")
    rows = []
    for name in names:
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        overrides = {"train": {**RECIPES[name], "steps": args.steps, "decay_steps": 4000, "warmup_steps": 2,
                               "eval_every": args.steps, "eval_batches": args.eval_batches, "ckpt_every": 0,
                               "log_every": 1, "out_dir": str(run.resolve())}}
        t0 = time.perf_counter()
        run_training(args.config, overrides=overrides, resume=False, quiet=True)
        wall = time.perf_counter() - t0
        records = read_metrics(run / "metrics.jsonl")
        after = records[-1]["val_nll"]
        # the step that also validates is slower by the evaluation: leave it out when there are others
        rate = statistics.median([r["tokens_per_s"] for r in records if "val_nll" not in r] or [records[-1]["tokens_per_s"]])
        # training time from the trainer's own rates (each record is one step): loading is left out
        per_step = records[0]["tokens"]
        train_s = sum(per_step / r["tokens_per_s"] for r in records)
        cpu_hours = train_s * threads / 3600
        row = {"recipe": name, **RECIPES[name], "steps": args.steps, "tokens": records[-1]["tokens"],
               "tokens_per_s": round(rate, 1), "train_s": round(train_s, 1), "wall_s": round(wall, 1), "threads": threads,
               "bound_before": round(before, 4), "bound_after": round(after, 4),
               "drop_per_cpu_hour": round((before - after) / cpu_hours, 3), "loss_last": round(records[-1]["loss"], 4)}
        rows.append(row)
        print(f"{name:15s} {rate:6.1f} tok/s  bound {before:.3f} -> {after:.3f} nats  "
              f"({row['drop_per_cpu_hour']:.2f} nats per CPU-hour, {wall:.0f} s)", flush=True)
        for checkpoints in run.glob("checkpoints"):
            shutil.rmtree(checkpoints, ignore_errors=True)
        shutil.rmtree(run / "final", ignore_errors=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": args.config, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
