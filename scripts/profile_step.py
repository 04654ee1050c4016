"""Where a block-diffusion decode step's time goes on this CPU, against the AR base's step, batch 1.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/profile_step.py --model runs/ship-test --prompts 2 --rounds 5

Times, interleaved over ``--rounds`` (medians; the machine is shared): the base's AR decoding (static
fast path), and the diffusion model (exact block cache, threshold policy) with its output head as
``StreamingLinear`` (the default) and as a plain ``nn.Linear`` (the head before it), checking that both
write the same tokens. Then one torch.profiler pass of each model, its operators' self time per
forward grouped as: layer linears by the number of rows they multiply, the head, attention, other ops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import Counter

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import unmask
from unmask.decoding import GenerationConfig, decode
from unmask.decoding.fast import FastARDecoder
from unmask.eval.heldout import heldout_documents
from unmask.eval.syntax import sample_headers
from unmask.models.transformer import StreamingLinear


def breakdown(fn, prompts: list[list[int]], vocab: int) -> tuple[int, Counter]:
    """Forward passes and self milliseconds per operator group over one decoding of every prompt."""
    nfe, groups = 0, Counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for ids in prompts:
            nfe += fn(ids).nfe
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1e3
        if e.key == "aten::mm":
            head = any(vocab in shape for shape in e.input_shapes[:2])
            groups["head" if head else f"layer linears, {e.input_shapes[0][0]} rows"] += ms
        elif "scaled_dot_product" in e.key:
            groups["attention"] += ms
        else:
            groups["other ops"] += ms
    return nfe, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/ship-test")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--data", default="runs/data/smollm2")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, base = unmask.load(args.model, device="cpu"), unmask.load(args.base, device="cpu")
    net = model.model
    headers = sample_headers(heldout_documents({}, [args.data]).documents, args.prompts, seed=0)
    prompts = [model.tokenizer.encode(h.text) for h in headers]
    config = GenerationConfig(max_new_tokens=args.gen, stop_at_eos=False, cache="prefix",
                              block_size=net.config.block_size, policy="threshold", threshold=args.threshold)
    fast_ar, ar_config = FastARDecoder(base.model), GenerationConfig(max_new_tokens=args.gen, stop_at_eos=False)
    lanes = {
        "AR base, fast path": (None, lambda ids: fast_ar.generate([ids], ar_config)),
        "diffusion, plain head": (nn.Linear, lambda ids: decode(net, [ids], config)),
        "diffusion, streaming head": (StreamingLinear, lambda ids: decode(net, [ids], config)),
    }
    times: dict[str, list[float]] = {}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for label, (head, fn) in lanes.items():
            if head is not None:
                net.head.__class__ = head
            seconds, nfe, out = 0.0, 0, []
            for ids in prompts:
                start = time.perf_counter()
                res = fn(ids)
                seconds += time.perf_counter() - start
                nfe += res.nfe
                out.append(res.sequences[0])
            times.setdefault(label, []).append(1000 * seconds / nfe)
            outputs.setdefault(label, out)
    net.head.__class__ = StreamingLinear
    print(f"{len(prompts)} prompts x {args.gen} tokens, batch 1, {args.threads} threads, {args.rounds} rounds, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")
    for label, ms in times.items():
        print(f"{label:28} {statistics.median(ms):6.1f} ms/forward (median; rounds {', '.join(f'{x:.0f}' for x in ms)})")
    same = outputs["diffusion, plain head"] == outputs["diffusion, streaming head"]
    print(f"diffusion tokens identical with either head: {same}")
    for label, fn in (("diffusion", lanes["diffusion, streaming head"][1]), ("AR base", lanes["AR base, fast path"][1])):
        nfe, groups = breakdown(fn, prompts, net.config.vocab_size)
        print(f"{label}: self time per forward, profiled ({nfe} forwards), {sum(groups.values()) / nfe:.1f} ms in all")
        for name, ms in groups.most_common():
            print(f"    {name:30} {ms / nfe:6.1f} ms")


if __name__ == "__main__":
    main()
