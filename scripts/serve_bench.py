"""Latency and throughput of `unmask serve`, measured from the client side over loopback.

    .venv/bin/python scripts/serve_bench.py                      # starts a server with the embedded model
    .venv/bin/python scripts/serve_bench.py --url http://127.0.0.1:8000 --api-key KEY

Prints, for a diffusing stream of a `--max-tokens` answer: time to the first canvas frame and
to the end (median of `--repeats` runs); then total answer tokens/s with 1, 8 and 32 concurrent
clients sending plain completion requests (`--requests` requests per concurrency level, or at
least one per client).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

PROMPT = "def quicksort(arr):\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "unmask", "serve", "--port", str(port), "--log-level", "warning",
           "--max-concurrency", str(args.max_concurrency), "--max-queue", "256", "--device", args.device,
           "--cache", args.cache]
    if args.model:
        cmd.append(args.model)
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not come up within 120 s")


def request_body(args: argparse.Namespace, seed: int, **extra: object) -> dict:
    body = {"prompt": PROMPT, "max_tokens": args.max_tokens, "seed": seed, "temperature": args.temperature}
    if args.policy:
        body["policy"] = args.policy
    if args.steps:
        body["steps"] = args.steps
    return {**body, **extra}


async def diffusing_run(client: httpx.AsyncClient, args: argparse.Namespace, seed: int) -> dict:
    """One streamed diffusing request: seconds to the first canvas and to the end, tokens, steps."""
    body = request_body(args, seed, stream=True, diffusing=True, stream_options={"include_usage": True})
    began = time.perf_counter()
    first = None
    steps = tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if "canvas" in choice:
                    first = first if first is not None else time.perf_counter() - began
                    steps = choice["canvas"]["step"]
    return {"first_frame_s": first, "total_s": time.perf_counter() - began, "tokens": tokens, "steps": steps}


async def throughput(client: httpx.AsyncClient, args: argparse.Namespace, clients: int) -> dict:
    """``clients`` workers send plain requests until ``max(requests, clients)`` are answered."""
    total = max(args.requests, clients)
    todo = iter(range(total))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for k in todo:
            r = await client.post("/v1/completions", json=request_body(args, 1000 + k))
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - began
    return {"clients": clients, "requests": total, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


async def bench(url: str, args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        await diffusing_run(client, args, seed=0)  # warm-up
        runs = [await diffusing_run(client, args, seed=s) for s in range(1, args.repeats + 1)]
        rates = [await throughput(client, args, c) for c in args.clients]
    return {"latency": runs, "throughput": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="benchmark a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("UNMASK_API_KEY"))
    p.add_argument("--model", help="model directory for the started server (default: the embedded model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-concurrency", type=int, default=32, help="batch size of the started server")
    p.add_argument("--cache", default="none", choices=("none", "prefix", "dual"), help="the started server's block cache")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--policy", help="decoding policy (default: the server's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the server's)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=5, help="diffusing runs for the latency median")
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = p.parse_args()

    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        result = asyncio.run(bench(url, args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; server: {url}")
    runs = result["latency"]
    med = {k: statistics.median(r[k] for r in runs) for k in ("first_frame_s", "total_s", "tokens", "steps")}
    print(f"diffusing stream, max_tokens {args.max_tokens} (median of {len(runs)}): first frame "
          f"{med['first_frame_s'] * 1000:.0f} ms, full answer {med['total_s'] * 1000:.0f} ms, "
          f"{med['tokens']:.0f} tokens in {med['steps']:.0f} steps")
    print("clients  requests  tokens  wall s  tokens/s")
    for r in result["throughput"]:
        print(f"{r['clients']:>7}  {r['requests']:>8}  {r['tokens']:>6}  {r['wall_s']:>6.2f}  {r['tokens_per_s']:>8.1f}")


if __name__ == "__main__":
    main()
