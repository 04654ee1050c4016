"""`unmask serve` end to end: a real server process on loopback, the official `openai` client.

The served diffusion model is tiny and random, with its logits sharpened so that candidates never
tie (a tie could be broken differently in a padded batch); every text the server returns is
compared with the library's own decoding of the same prompt and seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

from unmask.decoding import GenerationConfig, completion_text, generate, heal, infill
from unmask.decoding.settings import SETTINGS
from unmask.loading import load
from unmask.models.config import ModelConfig
from unmask.models.io import save_model
from unmask.models.transformer import Transformer

from test_settings import probes

KEY = "sk-test-unmask"
LONG = 480  # answer tokens of a request that takes seconds (one token per step)


def build_model_dir(directory: Path, tokenizer, attention: str) -> Path:
    """A random tiny model with a 512-token context, logits sharpened so that scores never tie."""
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=512,
        attention=attention, block_size=8, shifted=attention == "causal", mask_token_id=tokenizer.mask_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )
    model = Transformer(config)
    with torch.no_grad():
        model.norm.weight.mul_(6.0)
    save_model(model, directory)
    tokenizer.save(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def metric(self, name: str, model: str = "tiny") -> float:
        text = self.get("/metrics").text
        match = re.search(rf'^{name}\{{model="{model}"\}} (\S+)$', text, re.M)
        assert match, f"{name} missing from /metrics"
        return float(match.group(1))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the engine has nothing running or waiting (cancelled requests leave between steps)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("unmask_requests_running") == 0 and self.metric("unmask_requests_waiting") == 0:
                return
            time.sleep(0.05)
        raise AssertionError("the engine still has requests after the clients left")


def start_server(model_dir: Path, ar_dir: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "unmask", "serve", str(model_dir), "--ar-model", str(ar_dir),
           "--served-model-name", "tiny", "--port", str(port), "--device", "cpu", "--log-level", "warning", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNMASK_API_KEY": KEY}
    handle = log.open("w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server did not come up:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serve")
    return build_model_dir(root / "tiny", tiny_tokenizer, "bidirectional"), build_model_dir(
        root / "tiny-ar", tiny_tokenizer, "causal")


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    srv = start_server(*dirs, tmp_path_factory.mktemp("log") / "server.log", "--max-concurrency", "2",
                       "--max-queue", "4", "--shutdown-timeout", "0.5")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def loaded(dirs):
    return load(dirs[0], device="cpu")


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def library_text(loaded, prompt_ids, config, seed, suffix=None, token_healing=False) -> tuple[str, int]:
    """What the library writes for the same request: (text, answer tokens). Text prompts are healed
    by default in the server (``token_healing``); chat prompts are not."""
    healed = heal(loaded.tokenizer, prompt_ids, token_healing)
    if suffix is None:
        out = generate(loaded.model, [healed.ids], config, seeds=[seed], heal=[healed.heal])
    else:
        out = infill(loaded.model, [healed.ids], [suffix], config, seeds=[seed], heal=[healed.heal])
    return completion_text(loaded.tokenizer, out.sequences[0], healed.heal), len(out.sequences[0])


KNOBS = {"steps": 12, "block_size": 8, "policy": "confidence"}


def knob_config(max_tokens: int, temperature: float = 0.0, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_tokens, block_size=8, steps=12, policy="confidence",
                            temperature=temperature, **kw)


# ---------------------------------------------------------------------------- the happy paths


def test_models_lists_both(client):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "tiny-ar"}
    assert cards["tiny"].model_extra["diffusion"] is True and cards["tiny-ar"].model_extra["diffusion"] is False
    assert cards["tiny"].model_extra["max_model_len"] == 512


def test_completion_matches_library(client, loaded):
    prompt = "def add(a, b):\n"
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, seed=7, extra_body=KNOBS)
    text, count = library_text(loaded, loaded.tokenizer.encode(prompt), knob_config(24), 7, token_healing=True)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.choices[0].text == text
    assert out.usage.completion_tokens == count
    assert out.usage.prompt_tokens == len(heal(loaded.tokenizer, loaded.tokenizer.encode(prompt)).ids)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.model_extra["unmask"]["steps"] <= 12


def test_token_healing_is_a_request_field_on_by_default(client, loaded):
    prompt = "def add(a, b):\n"
    assert heal(loaded.tokenizer, loaded.tokenizer.encode(prompt)).heal is not None  # there is something to heal
    for healing in (True, False):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, seed=4,
                                        extra_body={**KNOBS, "token_healing": healing})
        text, _ = library_text(loaded, loaded.tokenizer.encode(prompt), knob_config(12), 4, token_healing=healing)
        assert out.choices[0].text == text


def test_factor_is_a_request_field(client, loaded):
    prompt = "def add(a, b):\n"
    body = {"block_size": 8, "factor": 3.0}  # a factor alone selects the factor policy
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, seed=7, extra_body=body)
    config = GenerationConfig(max_new_tokens=24, block_size=8, policy="factor", factor=3.0)
    text, _ = library_text(loaded, loaded.tokenizer.encode(prompt), config, 7, token_healing=True)
    assert out.choices[0].text == text
    healed = heal(loaded.tokenizer, loaded.tokenizer.encode(prompt))
    steps = generate(loaded.model, [healed.ids], config, seeds=[7], heal=[healed.heal]).steps[0]
    assert out.model_extra["unmask"]["steps"] == steps < 24
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4, extra_body={"factor": 3.0, "policy": "margin"})
    assert info.value.body["param"] == "factor" and "factor policy" in info.value.body["message"]


@pytest.mark.parametrize("s", [s for s in SETTINGS if s.field is not None], ids=lambda s: s.field)
def test_every_request_field_takes_what_its_flag_takes(server, s):
    """The values just inside and just outside each declared range (``test_settings.probes``, which the
    CLI's flags pass and refuse alike): 200, or a 400 naming the field."""
    ok, bad = probes(s)
    wrong_type = "1" if s.kind is not str else 1
    headers = {"Authorization": f"Bearer {KEY}"}
    for value in ok:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2, s.field: value}
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, (s.field, value, r.text)
    for value in [*bad, wrong_type]:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2, s.field: value}
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=60)
        error = r.json()["error"]
        assert r.status_code == 400 and set(error) == {"message", "type", "param", "code"}, (s.field, value, r.text)
        assert error["param"] == s.field and error["type"] == "invalid_request_error", error


def test_diffusing_stream_matches_plain_response(client):
    body = dict(model="tiny", prompt="for i in range(10):\n", max_tokens=24, seed=3, temperature=0.8)
    plain = client.completions.create(**body, extra_body=KNOBS)
    stream = client.completions.create(**body, stream=True, stream_options={"include_usage": True},
                                       extra_body={**KNOBS, "diffusing": True})
    chunks = list(stream)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == plain.usage.completion_tokens
    frames = [c.choices[0] for c in chunks[:-1]]
    canvases = [f.model_extra["canvas"] for f in frames]
    assert all(len(c["tokens"]) == 24 for c in canvases)
    steps = [c["step"] for c in canvases[:-1]]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= 12
    masked = [c["masked"] for c in canvases]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] < 24
    for before, after in zip(canvases, canvases[1:-1]):
        for i in after["committed"]:
            assert before["tokens"][i] is None and after["tokens"][i] is not None
    assert frames[-1].finish_reason == plain.choices[0].finish_reason
    assert all(f.finish_reason is None for f in frames[:-1])
    text = "".join(f.text for f in frames)
    assert text == plain.choices[0].text
    assert "".join(canvases[-1]["tokens"]) == text  # the final canvas spells the answer


def test_plain_stream_sends_settled_text_only(client):
    body = dict(model="tiny", prompt="class Point:\n", max_tokens=24, seed=5)
    plain = client.completions.create(**body, extra_body=KNOBS)
    chunks = list(client.completions.create(**body, stream=True, extra_body=KNOBS))
    assert all("canvas" not in (c.choices[0].model_extra or {}) for c in chunks)
    assert all(c.choices[0].text for c in chunks[:-1])  # no empty deltas without a canvas
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert len({c.id for c in chunks}) == 1


def test_chat_uses_the_template_and_end_of_turn(client, loaded):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add two numbers"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, seed=11, extra_body=KNOBS)
    tok = loaded.tokenizer
    config = knob_config(20, stop_ids=tuple(sorted(tok.stop_ids)))
    text, count = library_text(loaded, tok.encode_chat(messages), config, 11)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text and out.usage.completion_tokens == count
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, seed=11,
                                                 stream=True, extra_body=KNOBS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_fill_in_the_middle(server, loaded):
    body = {"model": "tiny", "prompt": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n", "max_tokens": 10,
            "seed": 2, **KNOBS}
    r = httpx.post(server.url + "/v1/fim/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    tok = loaded.tokenizer
    text, _ = library_text(loaded, tok.encode(body["prompt"]), knob_config(10), 2, suffix=tok.encode(body["suffix"]),
                           token_healing=True)
    assert r.json()["choices"][0]["text"] == text
    healed = heal(tok, tok.encode(body["prompt"]))
    assert r.json()["usage"]["prompt_tokens"] == len(healed.ids) + len(tok.encode(body["suffix"]))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    legacy = client.completions.create(model="tiny", prompt=body["prompt"], suffix=body["suffix"], max_tokens=10,
                                       seed=2, extra_body=KNOBS)  # OpenAI's insert mode: the same middle
    assert legacy.choices[0].text == text
    _bad(client, openai.BadRequestError, "suffix", model="tiny-ar", suffix="b")


def test_n_choices_use_consecutive_seeds(client):
    body = dict(model="tiny", prompt="import os\n", max_tokens=12, temperature=1.0, extra_body=KNOBS)
    many = client.completions.create(**body, n=3, seed=40)
    singles = [client.completions.create(**body, seed=40 + i).choices[0].text for i in range(3)]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == singles
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(**body, n=3, seed=40, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert list(streamed.values()) == singles


def test_stop_strings_cut_the_text(client):
    body = dict(model="tiny", prompt="def fib(n):\n", max_tokens=40, seed=9, extra_body={**KNOBS, "steps": 40})
    full = client.completions.create(**body).choices[0].text
    assert len(full) > 8, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]
    cut = client.completions.create(**body, stop=[stop, "\u2603never"])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**body, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_autoregressive_model_streams_token_by_token(client):
    chunks = list(client.completions.create(model="tiny-ar", prompt="def f(x):", max_tokens=10, seed=1,
                                            stream=True, extra_body={"diffusing": True}))
    canvases = [c.choices[0].model_extra["canvas"] for c in chunks]
    assert [c["committed"] for c in canvases[:-1]] == [[i] for i in range(len(canvases) - 1)]
    plain = client.completions.create(model="tiny-ar", prompt="def f(x):", max_tokens=10, seed=1)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


# ---------------------------------------------------------------------------- errors


def _bad(client, kind: type[openai.APIStatusError], param: str | None, **kw) -> None:
    with pytest.raises(kind) as info:
        client.completions.create(**{"model": "tiny", "prompt": "x", "max_tokens": 4, **kw})
    error = info.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"max_tokens": 600}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 9}, "n"),
        ({"seed": "seven"}, "seed"),
        ({"prompt": 5}, "prompt"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"extra_body": {"policy": "nope"}}, "policy"),
        ({"extra_body": {"steps": 0}}, "steps"),
        ({"extra_body": {"diffusing": True}}, "diffusing"),
        ({"prompt": [[3, 999999]]}, "prompt"),
    ],
)
def test_bad_requests_are_400(client, kw, param):
    _bad(client, openai.BadRequestError, param, **kw)


def test_chat_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[])
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": 5}])
    assert info.value.body["param"].startswith("messages.0.content")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 3000}])
    assert info.value.body["code"] == "context_length_exceeded"


def test_auth_model_route_and_size_errors(server, client):
    url, auth = server.url, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).status_code == 401
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    assert httpx.get(url + "/v1/nowhere", headers=auth).status_code == 404
    assert httpx.get(url + "/v1/completions", headers=auth).status_code == 405
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "x", ', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + "/v1/completions", content=b'[1, 2]', headers=auth)
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": NaN}', headers=auth)
    assert r.status_code == 400
    r = httpx.post(url + "/v1/fim/completions", json={"model": "tiny-ar", "prompt": "a", "suffix": "b"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="tiny", prompt="x" * (2 << 20), max_tokens=2)
    assert info.value.status_code == 413

    def chunked():  # no Content-Length: the limit applies to the bytes that arrive
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunked(), headers=auth)
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert server.get("/health").json()["status"] == "ok"
    assert client.completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].finish_reason


# ---------------------------------------------------------------------------- load, queue, disconnects


def _open_long_streams(server: Server, count: int) -> tuple[httpx.Client, list[httpx.Response]]:
    http = httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"})
    body = {"model": "tiny", "prompt": "x", "max_tokens": LONG, "steps": LONG, "block_size": LONG,
            "policy": "confidence", "stream": True, "diffusing": True}
    streams = []
    for _ in range(count):
        req = http.build_request("POST", server.url + "/v1/completions", json=body)
        streams.append(http.send(req, stream=True))
    return http, streams


def test_full_queue_is_429_with_retry_after(server, client):
    http, streams = _open_long_streams(server, 6)  # 2 running + 4 waiting fill the queue
    try:
        assert all(s.status_code == 200 for s in streams)
        deadline = time.monotonic() + 10
        state = None
        while state != (2, 4) and time.monotonic() < deadline:  # the engine admits 2 between steps
            time.sleep(0.02)
            state = (server.metric("unmask_requests_running"), server.metric("unmask_requests_waiting"))
        assert state == (2, 4), state
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model="tiny", prompt="x", max_tokens=4)
        assert info.value.response.headers["retry-after"] == "1"
        assert info.value.body["code"] == "queue_full"
    finally:
        for s in streams:
            s.close()
        http.close()
    server.wait_idle()  # waiting and running requests of gone clients are dropped
    assert server.get("/health").status_code == 200


def test_disconnect_cancels_within_steps(server, client):
    steps_before = server.metric("unmask_denoising_steps_total")
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=LONG, stream=True,
                                       extra_body={"steps": LONG, "block_size": LONG, "policy": "confidence",
                                                   "diffusing": True})
    for k, _ in enumerate(stream):
        if k == 2:
            break
    stream.close()
    server.wait_idle()
    taken = server.metric("unmask_denoising_steps_total") - steps_before
    assert 3 <= taken < LONG // 4, taken  # it stopped long before its natural end
    assert 'outcome="disconnected"' in server.get("/metrics").text


def test_disconnect_cancels_a_plain_request_too(server):
    steps_before = server.metric("unmask_denoising_steps_total")
    body = {"model": "tiny", "prompt": "x", "max_tokens": LONG, "steps": LONG, "block_size": LONG,
            "policy": "confidence"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(60, read=0.3))
    server.wait_idle()
    taken = server.metric("unmask_denoising_steps_total") - steps_before
    assert taken < LONG // 2, taken


def test_concurrent_streams_complete_or_get_429(server):
    prompts = [(f"def f{i}(x):\n", 100 + i) for i in range(32)]
    body = dict(model="tiny", max_tokens=12, temperature=0.9, extra_body=KNOBS)

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        solo = [(await client.completions.create(prompt=p, seed=s, **body)).choices[0].text for p, s in prompts]

        async def one(prompt, seed):
            try:
                stream = await client.completions.create(prompt=prompt, seed=seed, stream=True, **body)
                chunks = [c async for c in stream]
            except openai.RateLimitError:
                return None
            assert len({c.id for c in chunks}) == 1
            return "".join(c.choices[0].text for c in chunks)

        results = await asyncio.gather(*(one(p, s) for p, s in prompts), return_exceptions=True)
        await client.close()
        return solo, results

    solo, results = asyncio.run(main())
    unexpected = [r for r in results if isinstance(r, BaseException)]
    assert not unexpected, unexpected
    done = [k for k, r in enumerate(results) if r is not None]
    assert len(done) >= 2
    print(f"{len(done)} of {len(results)} concurrent streams completed, the rest got 429")
    assert all(results[k] == solo[k] for k in done)
    server.wait_idle()
    assert server.get("/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------- shutdown (keep last: it stops the server)


def test_sigterm_aborts_in_flight_within_the_timeout(server):
    srv = server
    events: list[str] = []
    first = threading.Event()

    def read() -> None:
        body = {"model": "tiny", "prompt": "x", "max_tokens": LONG, "steps": LONG, "block_size": LONG,
                "policy": "confidence", "stream": True, "diffusing": True}
        try:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
        except httpx.HTTPError as exc:
            events.append(f"transport error: {exc!r}")
        finally:
            first.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first.wait(30)
        began = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the exit status reports SIGTERM
        assert srv.proc.wait(timeout=30) in (0, -signal.SIGTERM), srv.log.read_text()
        took = time.monotonic() - began
        reader.join(10)
    finally:
        stop_server(srv)
        reader.join(10)
    assert "Traceback" not in srv.log.read_text()
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutdown", error
    assert took < 0.5 + 5 + 5, took  # timeout + uvicorn's backstop: the request's natural end is later
