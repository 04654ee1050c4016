"""The adapted diffusion coder against its AR base on this CPU, batch 1, real code prompts, one run.

    .venv/bin/python scripts/race_cpu.py --model default --base smollm2-135m --threads 2 \
        --settings threshold=0.9,threshold=0.7,threshold=0.5,tps=1,tps=2,tps=4 --json runs/eval/race.json

Prompts are function headers (signature + docstring) from the held-out split of the training
shards (``--data``; the same files `unmask eval syntax` draws from), each continued by 128 new
tokens, greedy, end-of-text ignored so every run writes the same number of tokens (with
``--stop-at-eos`` an answer ends at its EOS instead, and counts the tokens before it: a model
trained to end its answers would otherwise be timed writing filler after them). Per setting it
reports forward passes (NFE), tokens per forward (TPF), ms per forward, tokens/s, and the ratio to
the base's AR decoding in unmask measured in the same run (reference loop and the static-shape
fast path); with ``--llama-bench`` (the binary from scripts/build_llama_cpp.sh) llama.cpp's tg128
on the base's own GGUF file too. The settings interleave over ``--rounds`` and figures are medians,
because the machine is shared. Diffusion runs use the exact block KV cache of block-causal models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import unmask
from unmask.decoding import GenerationConfig, decode
from unmask.decoding.ar import ar_generate
from unmask.decoding.fast import FastARDecoder
from unmask.eval.heldout import heldout_documents
from unmask.eval.syntax import sample_headers
from unmask.hub import resolve_model


def parse_setting(text: str) -> tuple[str, dict[str, Any]]:
    key, _, value = text.partition("=")
    if key == "threshold":
        return text, {"policy": "threshold", "threshold": float(value)}
    if key == "tps":
        return text, {"policy": "confidence", "tokens_per_step": int(value)}
    raise SystemExit(f"unknown setting {text!r}: use threshold=T or tps=K")


def timed(fn) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def llama_bench(binary: Path, gguf: Path, threads: int) -> float:
    proc = subprocess.run([str(binary), "-m", str(gguf), "-p", "0", "-n", "128", "-t", str(threads), "-o", "json"],
                          capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout)
    return float(rows[0]["avg_ts"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--data", default="runs/data/smollm2", help="shard directory whose held-out files give the prompts")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settings", default="threshold=0.9,threshold=0.7,threshold=0.5,tps=1,tps=2,tps=4")
    parser.add_argument("--llama-bench", default=".cache/llama.cpp/bin/llama-bench")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="end each answer at its EOS (tokens counted up to it) instead of writing --gen tokens")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, base = unmask.load(args.model, device="cpu"), unmask.load(args.base, device="cpu")
    headers = sample_headers(heldout_documents({}, [args.data]).documents, args.prompts, seed=0)
    prompts = [model.tokenizer.encode(h.text) for h in headers]
    settings = [parse_setting(s) for s in args.settings.split(",")]
    fast_ar = FastARDecoder(base.model)
    samples: dict[str, list[dict[str, float]]] = {}

    def run(label: str, fn) -> None:
        seconds, nfe, tokens = 0.0, 0, 0
        for ids in prompts:
            dt, result = timed(lambda: fn(ids))
            seconds += dt
            nfe += result.nfe
            tokens += len(result.sequences[0])
        samples.setdefault(label, []).append({"seconds": seconds, "nfe": nfe, "tokens": tokens})

    ar_config = GenerationConfig(max_new_tokens=args.gen, stop_at_eos=args.stop_at_eos)
    for round_ in range(args.rounds):
        run("AR base, reference", lambda ids: ar_generate(base.model, [ids], ar_config))
        run("AR base, fast path", lambda ids: fast_ar.generate([ids], ar_config))
        for label, fields in settings:
            fields = dict(fields)
            per_step = fields.pop("tokens_per_step", None)
            steps = None if per_step is None else -(-args.gen // per_step)
            config = GenerationConfig(max_new_tokens=args.gen, stop_at_eos=args.stop_at_eos, cache="prefix", steps=steps,
                                      block_size=model.model.config.block_size, **fields)
            run(f"diffusion, {label}", lambda ids, c=config: decode(model.model, [ids], c))
    rows = []
    for label, runs in samples.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        nfe, tokens = runs[0]["nfe"], runs[0]["tokens"]
        rows.append({"setting": label, "nfe": nfe, "tokens": tokens, "tokens_per_forward": tokens / nfe,
                     "ms_per_forward": 1000 * seconds / nfe, "tokens_per_s": tokens / seconds})
    reference = next(r["tokens_per_s"] for r in rows if r["setting"] == "AR base, fast path")
    peer = None
    binary, gguf = Path(args.llama_bench), resolve_model(args.base)
    if binary.is_file() and gguf.is_file():
        peer = statistics.median(llama_bench(binary, gguf, args.threads) for _ in range(args.rounds))
    print(f"{len(prompts)} prompts x {args.gen} tokens, batch 1, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}")
    print(f"{'setting':28} {'NFE':>6} {'TPF':>5} {'ms/fwd':>7} {'tok/s':>7} {'x AR':>6}" + ("  x llama.cpp" if peer else ""))
    for row in rows:
        row["vs_ar_fast"] = row["tokens_per_s"] / reference
        if peer:
            row["vs_llama_cpp"] = row["tokens_per_s"] / peer
        print(f"{row['setting']:28} {row['nfe']:6d} {row['tokens_per_forward']:5.2f} {row['ms_per_forward']:7.1f} "
              f"{row['tokens_per_s']:7.1f} {row['vs_ar_fast']:6.2f}" + (f"  {row['vs_llama_cpp']:.2f}" if peer else ""))
    if peer:
        print(f"llama.cpp llama-bench tg128 on {gguf.name}, {args.threads} threads: {peer:.1f} tok/s")
    if args.json:
        record = {"rows": rows, "llama_cpp_tg128": peer, "threads": args.threads, "prompts": len(prompts), "gen": args.gen,
                  "stop_at_eos": args.stop_at_eos, "torch": torch.__version__, "load_average": os.getloadavg()[0], "model": args.model, "base": args.base}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
