"""One name for the embedded model: `default` in `unmask list`, `--model` and the API; the old API name still answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_api_names_the_shipped_models_as_unmask_list_does() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    listed = subprocess.run([sys.executable, "-m", "unmask", "list", "--json"], capture_output=True, text=True,
                            env=env, timeout=120, check=True)
    names = {e["name"] for e in json.loads(listed.stdout)}
    assert {"default", "coder-nano-cpu", "coder-nano-cpu-ar"} <= names

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "unmask", "serve", "--ar-model", "default-ar", "--port", str(port),
                               "--device", "cpu", "--log-level", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "unmask serve did not come up"
            time.sleep(0.2)
        served = [card["id"] for card in httpx.get(f"{base}/v1/models").json()["data"]]
        assert served == ["default", "default-ar"]
        for name in ("default", "unmask-default"):
            answer = httpx.post(f"{base}/v1/completions", timeout=60,
                                json={"model": name, "prompt": "def f(x):\n", "max_tokens": 4, "steps": 2})
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "default"
        missing = httpx.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1})
        assert missing.status_code == 404
    finally:
        server.terminate()
        server.wait(timeout=30)
