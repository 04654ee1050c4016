"""`unmask serve` under hostile requests and a hostile chat template: a real server on loopback.

Every bad request must get a 4xx OpenAI-style error object, the process must stay up and keep
answering others (``/health`` stays fast), and SIGTERM must still end it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_model_dir
from test_serve import free_port

# A template that behaves unless the first role asks it not to: nested loops (time), a huge
# repetition (memory at once) and repeated doubling (memory over time).
HOSTILE_TEMPLATE = (
    "{% if messages[0]['role'] == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}{% endif %}"
    "{% if messages[0]['role'] == 'big' %}{{ 'x' * 10**8 }}{% endif %}"
    "{% if messages[0]['role'] == 'grow' %}{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    directory = make_model_dir(tmp_path_factory.mktemp("hostile") / "tiny", tiny_tokenizer)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = HOSTILE_TEMPLATE
    config_file.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def url(hostile_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    cmd = [sys.executable, "-m", "unmask", "serve", str(hostile_dir), "--served-model-name", "tiny", "--port",
           str(port), "--device", "cpu", "--log-level", "warning", "--shutdown-timeout", "0.5", "--allow-host", "allowed.example"]
    env = {k: v for k, v in os.environ.items() if k != "UNMASK_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**env, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield base
    proc.terminate()  # SIGTERM ends it, even after hostile templates ran
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the server ignored SIGTERM")
    text = log.read_text()
    assert "Traceback" not in text, text


def post(url: str, path: str, raw: bytes | str, timeout: float = 30, **headers: str) -> httpx.Response:
    data = raw.encode() if isinstance(raw, str) else raw
    return httpx.post(url + path, content=data, headers={**JSON, **headers}, timeout=timeout)


def assert_error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def assert_alive(url: str) -> None:
    r = post(url, "/v1/completions", json.dumps({"prompt": "def", "max_tokens": 2}))
    assert r.status_code == 200, r.text


# Raw JSON: "\ud800" in the body is the six characters of the escape, a lone surrogate once parsed.
SURROGATE = '"\\ud800abc"'
TEXT_FIELDS = [
    ("/v1/completions", '{"prompt": %s}'),
    ("/v1/completions", '{"prompt": ["ok", %s]}'),
    ("/v1/completions", '{"prompt": "ok", "suffix": %s}'),
    ("/v1/completions", '{"prompt": "ok", "stop": %s}'),
    ("/v1/completions", '{"prompt": "ok", "stop": ["x", %s]}'),
    ("/v1/completions", '{"prompt": "ok", "model": %s}'),
    ("/v1/completions", '{"prompt": "ok", "user": %s}'),
    ("/v1/completions", '{"prompt": "ok", "policy": %s}'),
    ("/v1/completions", '{"prompt": "ok", %s: 1}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": %s}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": %s, "content": "hi"}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": %s}'),
    ("/v1/fim/completions", '{"prompt": %s, "suffix": "x"}'),
    ("/v1/fim/completions", '{"prompt": "x", "suffix": %s}'),
]


@pytest.mark.parametrize("path,template", TEXT_FIELDS)
def test_text_no_tokenizer_can_take_is_a_400_in_every_field(url, path, template):
    error = assert_error(post(url, path, template % SURROGATE))
    assert error["code"] == "invalid_text"


def test_the_server_answers_after_unencodable_text(url):
    for path, template in TEXT_FIELDS[:3]:
        post(url, path, template % '"\\udfff\\ud800"')
    assert_alive(url)


@pytest.mark.parametrize("raw", [
    '{"prompt": ' + "[" * 1000 + "]" * 1000 + "}",
    "[" * 100_000 + "]" * 100_000,
    '{"prompt": "x", "stop": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
    '{"messages": ' + "[" * 200_000,  # unclosed as well
])
def test_pathological_nesting_is_a_400(url, raw):
    error = assert_error(post(url, "/v1/completions", raw))
    assert error["code"] == "invalid_json"


def test_brackets_inside_strings_are_not_nesting(url):
    r = post(url, "/v1/completions", json.dumps({"prompt": "[{" * 2000, "max_tokens": 2}))
    assert r.status_code in (200, 400), r.text
    assert r.status_code == 200 or r.json()["error"]["code"] == "context_length_exceeded"


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenised(url):
    for body in ({"prompt": "a" * 900_000}, {"prompt": ["x", "b" * 500_000]}, {"prompt": "x", "suffix": "c" * 900_000},
                 {"messages": [{"role": "user", "content": "d" * 900_000}]}):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        started = time.perf_counter()
        error = assert_error(post(url, path, json.dumps(body)))
        assert error["code"] == "context_length_exceeded"
        assert time.perf_counter() - started < 2.0
    error = assert_error(post(url, "/v1/fim/completions", json.dumps({"prompt": "e" * 900_000, "suffix": "x"})))
    assert error["code"] == "context_length_exceeded"
    error = assert_error(post(url, "/v1/completions", json.dumps({"prompt": list(range(5)) * 50_000})))
    assert error["code"] == "context_length_exceeded"
    error = assert_error(post(url, "/v1/completions", json.dumps({"prompt": "x", "stop": "s" * 5000})))
    assert error["param"] == "stop"


def test_health_stays_fast_while_clients_send_large_prompts(url):
    body = json.dumps({"prompt": "z" * 1_000_000, "max_tokens": 4}).encode()[: (1 << 20) - 64]
    body = json.dumps({"prompt": "z" * (len(body) - 40), "max_tokens": 4}).encode()
    stop = threading.Event()
    codes: list[int] = []

    def hammer() -> None:
        with httpx.Client(timeout=60, headers=JSON) as http:
            while not stop.is_set():
                codes.append(http.post(url + "/v1/completions", content=body).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    latencies = []
    try:
        time.sleep(0.5)
        with httpx.Client(timeout=30) as http:
            for _ in range(40):
                started = time.perf_counter()
                assert http.get(url + "/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert codes and set(codes) == {400}
    latencies.sort()
    assert latencies[-1] < 1.0, latencies  # was ~9 s with tokenising on the event loop; see docs/serving.md


@pytest.mark.parametrize("role", ["loop", "big", "grow"])
def test_a_hostile_chat_template_is_bounded_and_the_server_keeps_serving(url, role):
    result: dict[str, httpx.Response] = {}

    def chat() -> None:
        body = {"messages": [{"role": role, "content": "hi"}], "max_tokens": 2}
        result["r"] = post(url, "/v1/chat/completions", json.dumps(body))

    started = time.perf_counter()
    worker = threading.Thread(target=chat)
    worker.start()
    time.sleep(0.3)
    health = httpx.get(url + "/health", timeout=5)  # answered while the template runs
    assert health.status_code == 200
    worker.join(timeout=30)
    assert not worker.is_alive()
    error = assert_error(result["r"])
    assert error["param"] == "messages" and "chat template" in error["message"]
    assert time.perf_counter() - started < 15
    ok = post(url, "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    assert ok.status_code == 200, ok.text


def test_foreign_host_headers_and_non_json_bodies_are_refused(url):
    body = json.dumps({"prompt": "def", "max_tokens": 2})
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example"):
        error = assert_error(post(url, "/v1/completions", body, Host=host), 421)
        assert error["code"] == "host_not_allowed"
        assert_error(httpx.get(url + "/health", headers={"Host": host}, timeout=5), 421)
        assert_error(httpx.get(url + "/v1/models", headers={"Host": host}, timeout=5), 421)
    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "10.1.2.3", "allowed.example",
                 f"Allowed.Example:{port}"):
        assert post(url, "/v1/completions", body, Host=host).status_code == 200, host
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": ctype}, timeout=10)
        assert assert_error(r, 415)["code"] == "unsupported_media_type"
    r = httpx.post(url + "/v1/completions", content=body, timeout=10)  # no Content-Type at all
    assert_error(r, 415)
    r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"},
                   timeout=10)
    assert r.status_code == 200, r.text


def test_schema_fuzzing_finds_no_5xx(url):
    """A short run of scripts/fuzz_serve.py (docs/serving.md has a long one)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_serve.py"
    proc = subprocess.run([sys.executable, str(script), "--url", url, "--examples", "40"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "; 5xx: 0;" in proc.stdout and "bad answers: 0" in proc.stdout, proc.stdout
