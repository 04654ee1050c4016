"""/health latency of `unmask serve` while clients send 1 MB prompts, measured over loopback.

    .venv/bin/python scripts/health_latency.py                 # starts a server with the embedded model
    .venv/bin/python scripts/health_latency.py --url http://127.0.0.1:8000 --clients 8 --seconds 20

`--clients` threads each POST a completion whose prompt fills the 1 MiB body limit, as fast as
the server answers; meanwhile /health is requested every `--interval` seconds. Prints the
/health latency percentiles and what the large requests got back.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import threading
import time

import httpx
from serve_bench import start_server as bench_server


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    """A server on a free loopback port (serve_bench's), CPU, default settings."""
    return bench_server(argparse.Namespace(model=model, max_concurrency=8, device="cpu", cache="none"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument("--model", help="model for the started server (default: the embedded one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    proc, url = (None, args.url) if args.url else start_server(args.model)
    size = (1 << 20) - 64
    body = json.dumps({"prompt": "z" * (size - 40), "max_tokens": 8}).encode()
    stop = threading.Event()
    statuses: collections.Counter[int] = collections.Counter()
    answer_times: list[float] = []

    def client() -> None:
        with httpx.Client(timeout=120, headers={"Content-Type": "application/json"}) as http:
            while not stop.is_set():
                started = time.perf_counter()
                statuses[http.post(url + "/v1/completions", content=body).status_code] += 1
                answer_times.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let every client get a request in flight
    latencies = []
    deadline = time.monotonic() + args.seconds
    with httpx.Client(timeout=60) as http:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            http.get(url + "/health").raise_for_status()
            latencies.append(time.perf_counter() - started)
            time.sleep(args.interval)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=30)
    latencies.sort()
    ms = [v * 1000 for v in latencies]
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(f"{args.clients} clients x {len(body) / 2**20:.2f} MiB prompts for {args.seconds:g} s: "
          f"{sum(statuses.values())} large requests, statuses {dict(statuses)}, "
          f"median answer {statistics.median(answer_times) * 1000:.0f} ms")
    print(f"/health: {len(ms)} requests, p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms")


if __name__ == "__main__":
    main()
