"""Fuzz `unmask serve` with hypothesis-generated bodies built from the request schemas; count the statuses.

    .venv/bin/python scripts/fuzz_serve.py                          # starts a server with the embedded model
    .venv/bin/python scripts/fuzz_serve.py --url http://127.0.0.1:8000 --examples 2000

For each route, bodies are objects whose keys are the schema's fields (each present or not) with
values that are either plausible for the field or any JSON at all (text with lone surrogates,
deep lists, wrong types), plus raw bytes that are not JSON. Every answer must be a 2xx, or a
4xx with an OpenAI-style error object; the run fails on the first 5xx or malformed error and
prints the counts either way. Exit status 0 = no 5xx.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys

import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from serve_bench import start_server as bench_server

from unmask.serve.schemas import ChatCompletionRequest, CompletionRequest, FimRequest

ROUTES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
          "/v1/fim/completions": FimRequest}

texts = st.one_of(
    st.text(max_size=24), st.text(max_size=24), st.text(max_size=24),
    st.sampled_from(["\ud800", "a\udfffb", "", "\x00", "<|mask|>", "<|im_end|>", "def f(x):\n    return x\n"]),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), texts)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                        max_leaves=12)
small = st.integers(-2, 6)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x y", ""]) | texts,
                                 "content": texts | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                     "text": texts}), max_size=2)})
PLAUSIBLE = {
    "prompt": texts | st.lists(texts, max_size=3) | st.lists(st.integers(-1, 400), max_size=6),
    "suffix": texts, "messages": st.lists(message, max_size=3), "stop": texts | st.lists(texts, max_size=5),
    "max_tokens": small, "max_completion_tokens": small, "n": st.integers(-1, 3), "steps": small,
    "block_size": small, "top_k": small, "seed": st.integers(-1, 2**64), "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5), "threshold": st.floats(-0.5, 1.5),
    "policy": st.sampled_from(["threshold", "confidence", "random", "nope"]) | texts,
    "stream": st.booleans(), "diffusing": st.booleans(), "model": st.sampled_from(["tiny", "unmask-default", "nope"]),
}


def value(name: str) -> st.SearchStrategy:
    plausible = PLAUSIBLE.get(name, anything)
    return st.one_of(plausible, plausible, plausible, plausible, plausible, anything)


def body_strategy(schema: type) -> st.SearchStrategy[bytes]:
    required = [n for n, f in schema.model_fields.items() if f.is_required()]
    optional = [n for n in schema.model_fields if n not in required]

    def build(keys: list[str]) -> st.SearchStrategy[dict]:
        return st.fixed_dictionaries({k: value(k) for k in keys})

    some_required = st.sampled_from([required, required, required, []])
    chosen = st.tuples(some_required, st.lists(st.sampled_from(optional), unique=True, max_size=3))
    objects = chosen.flatmap(lambda keys: build([*keys[0], *keys[1]])).map(lambda d: json.dumps(d).encode())
    return st.one_of(objects, objects, objects, anything.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64))


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    """A server on a free loopback port (serve_bench's), CPU, default settings."""
    return bench_server(argparse.Namespace(model=model, max_concurrency=8, device="cpu", cache="none"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running server (default: start one with the embedded model)")
    parser.add_argument("--examples", type=int, default=300, help="bodies per route")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    proc, url = (None, args.url) if args.url else start_server(None)
    counts: collections.Counter[int] = collections.Counter()
    bad: list[str] = []
    http = httpx.Client(timeout=60, headers={"Content-Type": "application/json"})
    try:
        for route, schema in ROUTES.items():
            @settings(max_examples=args.examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(body_strategy(schema))
            def probe(raw: bytes) -> None:
                r = http.post(url + route, content=raw)
                counts[r.status_code] += 1
                ok = r.status_code < 400
                if not ok:
                    try:
                        error = r.json()["error"]
                        ok = r.status_code < 500 and {"message", "type", "param", "code"} <= set(error)
                    except (ValueError, KeyError, TypeError):
                        ok = False
                if not ok:
                    bad.append(f"{route} {r.status_code} {raw[:200]!r} -> {r.text[:200]}")

            probe()
        health = http.get(url + "/health").status_code
    finally:
        http.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    total = sum(counts.values())
    fives = sum(v for k, v in counts.items() if k >= 500)
    print(f"{total} requests; statuses {dict(sorted(counts.items()))}; 5xx: {fives}; bad answers: {len(bad)}; "
          f"/health after: {health}")
    for line in bad[:10]:
        print("  " + line)
    return 1 if bad or health != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
