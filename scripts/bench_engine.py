"""The request engine's cost per step on this machine: concurrent requests through one `Engine`.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_engine.py --model coder-nano-cpu --requests 8 \
        --max-batch 4 --rounds 5 --json runs/bench/engine.json

Submits ``--requests`` requests at once (prompts of 3..40 tokens, 32 new tokens each, greedy,
end-of-text ignored so that every run does the same work), lets the engine batch them ``--max-batch``
at a time, and reports the engine's forward passes, ms per forward pass (wall time / passes), and
generated tokens/s. Runs repeat ``--rounds`` times and figures are medians. The script uses only
the engine's public API, so the same file measures an older checkout (run it with that checkout's
``src`` first on ``PYTHONPATH``) for a before/after comparison in one sitting.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

import unmask
from unmask.decoding import GenerationConfig
from unmask.engine import Engine, EngineRequest


def requests(vocab: int, count: int, new: int, block: int | None, cache: str, policy: str) -> list[EngineRequest]:
    rng = random.Random(0)
    out = []
    for i in range(count):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(3, 40))]
        config = GenerationConfig(max_new_tokens=new, block_size=block, policy=policy, stop_at_eos=False, cache=cache)
        out.append(EngineRequest(prompt, config, seed=i, frames=False))
    return out


def run(model, reqs: list[EngineRequest], max_batch: int, cache: str) -> dict[str, float]:
    engine = Engine(model, max_batch=max_batch, max_queue=len(reqs), cache=cache).start()
    try:
        start = time.perf_counter()
        handles = [engine.submit(r) for r in reqs]
        finals = [h.result() for h in handles]
        wall = time.perf_counter() - start
    finally:
        engine.shutdown_sync()
    passes = engine.stats()["forward_passes"]
    tokens = sum(len(f.tokens) for f in finals)
    return {"wall_s": wall, "forward_passes": passes, "ms_per_pass": 1000 * wall / passes, "tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="coder-nano-cpu")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--new", type=int, default=32, help="tokens each request writes")
    parser.add_argument("--block", type=int, default=None, help="block size (default: the model's own, else 32)")
    parser.add_argument("--cache", default="prefix", help="the engine's block cache: none | prefix | dual")
    parser.add_argument("--policy", default="confidence")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = unmask.load(args.model, device="cpu")
    model = loaded.model
    block = args.block or (model.config.block_size if model.config.attention == "block" else 32)
    reqs = requests(model.config.vocab_size, args.requests, args.new, block, args.cache, args.policy)
    run(model, reqs[:2], args.max_batch, args.cache)  # warm-up
    rounds = [run(model, reqs, args.max_batch, args.cache) for _ in range(args.rounds)]
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    record = {
        "command": "scripts/bench_engine.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "model": args.model, "attention": model.config.attention, "block": block, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "rounds": rounds, "median": summary,
    }
    print(f"{args.model}: {args.requests} requests x {args.new} tokens, batch {args.max_batch}, cache {args.cache}, "
          f"{args.threads} thread(s): {summary['forward_passes']:.0f} passes, {summary['ms_per_pass']:.1f} ms/pass, "
          f"{summary['tokens_per_s']:.1f} tok/s (median of {args.rounds})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
