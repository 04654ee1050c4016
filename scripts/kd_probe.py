"""How closely a diffusion student reproduces its AR teacher's answers, and in how few steps.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/kd_probe.py --pairs runs/sft/smollm2-kd.jsonl \
        --model default --model runs/kd-delta --thresholds 0.9,0.5,0.3

``--model`` takes anything ``unmask.load`` reads with a tokenizer: a name, a run's ``final/``, or a
delta made from a checkpoint with ``scripts/make_delta.py --tokenizer`` (checkpoints hold no tokenizer).

The prompts are the held-out examples of an `unmask data distill` output (the ones the SFT
trainer keeps out: ``val_fraction`` of them by record hash), whose completions are the teacher's
greedy bodies. Each model answers each prompt at batch 1 (threshold policy, the model's block
size, the exact block KV cache, stopping at EOS), and per model and threshold the script prints
tokens per forward (TPF), the share of answers whose body (``unmask.train.distill.function_body``)
is the teacher's exactly, and the share of the teacher's body text that the answer reproduces
before it first differs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import unmask
from unmask.decoding import GenerationConfig, decode
from unmask.train.distill import function_body
from unmask.train.sft import is_val, read_records, record_hash


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", required=True, help="an `unmask data distill` output")
    p.add_argument("--model", action="append", required=True, help="diffusion model (repeatable)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="the training config's val_fraction")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--gen", type=int, default=128, help="canvas length (answers end at EOS)")
    p.add_argument("--thresholds", default="0.9")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    held = [r for _, r in read_records(args.pairs) if is_val(record_hash(r), args.val_fraction)][: args.limit]
    rows = []
    for name in args.model:
        loaded = unmask.load(name)
        model, tok = loaded.model, loaded.tokenizer
        for threshold in (float(t) for t in args.thresholds.split(",")):
            config = GenerationConfig(max_new_tokens=args.gen, policy="threshold", threshold=threshold, cache="prefix",
                                      block_size=model.config.block_size)
            tokens = nfe = exact = matched = total = 0
            answers = []
            started = time.perf_counter()
            for record in held:
                out = decode(model, [tok.encode(record["prompt"])], config)
                ids = out.sequences[0]
                tokens, nfe = tokens + len(ids), nfe + out.nfe
                body, _ = function_body(tok.decode(ids))
                exact += body == record["completion"]
                want = record["completion"]
                matched += len(os.path.commonprefix([body, want]))
                total += len(want)
                answers.append(body)
            row = {"model": name, "threshold": threshold, "prompts": len(held), "tpf": tokens / max(nfe, 1),
                   "exact": exact / len(held), "prefix_share": matched / max(total, 1),
                   "seconds": time.perf_counter() - started, "answers": answers}
            rows.append(row)
            print(f"{name}  threshold {threshold}: TPF {row['tpf']:.2f}, exact {exact}/{len(held)}, "
                  f"teacher's text reproduced {row['prefix_share']:.1%}, {row['seconds']:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
