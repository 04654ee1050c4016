"""One forward pass of the embedded model over 256 tokens, timed with N torch threads.

    python scripts/forward_threads.py 1
    python scripts/forward_threads.py 2

Prints the median and the slowest of 5 passes after a warm-up. Run it beside other work (a
training run) to see what spinning OpenMP threads cost when a core is taken (README, Use).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import unmask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--tokens", type=int, default=256, help="sequence length of the pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = unmask.load(device="cpu").model
    ids = torch.randint(10, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        model(ids)
        for _ in range(5):
            began = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - began)
    print(f"{torch.get_num_threads()} threads: median {statistics.median(times):.3f} s, slowest {max(times):.3f} s")


if __name__ == "__main__":
    main()
