"""The web playground in real headless Chromium, against a real `unmask serve` on loopback.

The server runs as a subprocess with a tiny diffusion model and a tiny AR model; Playwright drives
Debian's /usr/bin/chromium (never a downloaded browser). Each check compares what the page shows
with what the API answers for the same request, fetched independently with httpx.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "def add(a, b):\n"
SETTINGS = {"max_tokens": 32, "steps": 16, "block_size": 8, "temperature": 0, "seed": 7}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium")


# ---------------------------------------------------------------------------- the server and the browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tiny_ar_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`unmask serve` with a diffusion model and an AR model; yields the base URL and the model names."""
    yield from _serve(tiny_model_dir, tiny_ar_model_dir, tmp_path_factory)


def _serve(tiny_model_dir: Path, tiny_ar_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("UNMASK_API_KEY", None)
    command = [sys.executable, "-m", "unmask", "serve", str(tiny_model_dir), "--ar-model", str(tiny_ar_model_dir),
               "--port", str(port), "--log-level", "warning"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"unmask serve exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"unmask serve did not come up:\n{log.read_text()}")
            time.sleep(0.2)
        cards = httpx.get(f"{base}/v1/models").json()["data"]
        diffusion = next(c["id"] for c in cards if c["diffusion"])
        ar = next(c["id"] for c in cards if not c["diffusion"])
        yield {"base": base, "diffusion": diffusion, "ar": ar}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    yield context
    context.close()


@pytest.fixture
def page(context, server):
    """A fresh page on the playground, models loaded; its API requests are kept in ``page.posts``."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.posts = []
    page.on("request", lambda r: page.posts.append(r) if r.method == "POST" else None)
    page.goto(server["base"] + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    yield page
    page.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ---------------------------------------------------------------------------- helpers


def _settings(page, settings: dict, playback: str = "0") -> None:
    page.fill("#max-tokens", str(settings["max_tokens"]))
    page.fill("#steps", str(settings["steps"]))
    page.fill("#block-size", str(settings["block_size"]))
    page.fill("#temperature", str(settings["temperature"]))
    page.fill("#seed", str(settings["seed"]))
    page.select_option("#playback", playback)


def _set_race(page, on: bool) -> None:
    if page.is_checked("#race") != on:
        page.click("label.switch")
    assert page.is_checked("#race") == on


def _run(page, timeout_ms: int = 30_000) -> None:
    """Click Run and wait until the page has finished the run (every lane done, stopped or failed)."""
    before = int(page.evaluate("document.body.dataset.runs || '0'"))
    page.click("#run")
    page.wait_for_function(f"Number(document.body.dataset.runs || 0) > {before}", timeout=timeout_ms)


def _watch_masks(page) -> None:
    """Record, per lane, the masked placeholders on screen at every paint and after every DOM change."""
    page.evaluate(
        """() => {
        window.seen = {painted: {}, dom: {}};
        const sample = (where) => {
          for (const lane of document.querySelectorAll('#lanes .lane')) {
            const name = lane.querySelector('.lane-model').textContent;
            (where[name] ||= []).push(lane.querySelectorAll('.answer .m').length);
          }
        };
        const paint = () => { sample(window.seen.painted); requestAnimationFrame(paint); };
        requestAnimationFrame(paint);
        new MutationObserver(() => sample(window.seen.dom)).observe(
          document.querySelector('#lanes'), {subtree: true, childList: true, characterData: true, attributes: true});
      }"""
    )


def _api_text(server: dict, path: str, body: dict) -> dict:
    response = httpx.post(server["base"] + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _lane(page, model: str):
    return page.locator("#lanes .lane", has=page.locator(".lane-model", has_text=model))


def _counters(lane) -> dict[str, str]:
    return {name: lane.locator(f"[data-counter={name}]").text_content() for name in ("elapsed", "tps", "steps", "tps-step")}


def _untruncated_names(page) -> list[str]:
    """The lanes whose header shows the model's whole name (not cut by an ellipsis or the lane's edge)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('#lanes .lane')].filter((lane) => {
          const name = lane.querySelector('.lane-model');
          const box = name.getBoundingClientRect(), head = lane.querySelector('.lane-head').getBoundingClientRect();
          return name.scrollWidth <= name.clientWidth && box.right <= head.right && box.width > 0;
        }).map((lane) => lane.querySelector('.lane-model').textContent)"""
    )


def _check_verdict(page, server: dict) -> None:
    """The badge compares the two lanes on the time to the same text: the shorter answer's length."""
    texts = {m: _api_text(server, "/v1/completions", {"model": m, "prompt": PROMPT, **SETTINGS})["choices"][0]["text"]
             for m in (server["diffusion"], server["ar"])}
    chars = min(len(t) for t in texts.values())
    assert page.get_attribute("#lanes", "data-race-chars") == str(chars)
    winner = page.locator("#lanes .lane.won")
    loser = page.locator("#lanes .lane:not(.won)")
    assert winner.locator(".badge").text_content().endswith(f"faster to {chars} chars")
    assert loser.locator(".badge").text_content().endswith(f"slower to {chars} chars")
    assert float(winner.get_attribute("data-race-seconds")) <= float(loser.get_attribute("data-race-seconds"))
    assert winner.locator(".badge").get_attribute("title").startswith(f"time to the first {chars} characters")
    assert sorted(_untruncated_names(page)) == sorted(texts), "a lane's name is cut off next to its badge"


def _check_png(path: Path) -> None:
    """A well-formed PNG with real content: header, consistent IHDR/IDAT sizes, many distinct byte values."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, idat, ihdr = 8, b"", None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    assert ihdr is not None, "no IHDR chunk"
    width, height, depth, color = ihdr[:4]
    channels = {2: 3, 6: 4}[color]
    raw = zlib.decompress(idat)
    assert depth == 8 and len(raw) == height * (1 + width * channels)
    assert width > 200 and height > 200
    assert len(set(raw)) > 64, "the screenshot is (nearly) blank"


# ---------------------------------------------------------------------------- tests


def test_completion_animates_and_ends_on_the_api_text(page, server, tmp_path: Path) -> None:
    _set_race(page, False)
    page.fill("#prompt", PROMPT)
    _settings(page, SETTINGS, playback="60")  # one step every 60 ms, so every frame gets painted
    _watch_masks(page)
    _run(page)
    lane = _lane(page, server["diffusion"])
    assert lane.get_attribute("data-state") == "done", page.locator("#error").text_content()

    # Intermediate frames with masked placeholders were painted, resolving step by step.
    seen = page.evaluate("window.seen.painted")[server["diffusion"]]
    partial = {m for m in seen if 0 < m}
    assert max(seen) >= SETTINGS["max_tokens"] // 2, seen
    assert len(partial) >= 3, seen
    assert int(lane.get_attribute("data-max-masked")) >= max(seen)
    assert lane.locator(".answer .m").count() == 0

    (request,) = page.posts
    assert request.url.endswith("/v1/completions")
    sent = request.post_data_json
    assert sent["stream"] is True and sent["diffusing"] is True
    assert {k: sent[k] for k in SETTINGS} == SETTINGS and sent["prompt"] == PROMPT
    assert "authorization" not in request.headers

    expected = _api_text(server, "/v1/completions", {"model": server["diffusion"], "prompt": PROMPT, **SETTINGS})
    assert lane.locator(".answer").text_content() == expected["choices"][0]["text"]
    assert lane.locator(".ctx-before").text_content() == PROMPT

    counters = _counters(lane)
    assert all(v not in ("", "–") for v in counters.values()), counters
    assert float(counters["elapsed"].removesuffix(" s")) > 0
    assert float(counters["tps"]) > 0
    assert int(counters["steps"]) == expected["unmask"]["steps"]
    tokens = expected["usage"]["completion_tokens"]
    assert float(counters["tps-step"]) == pytest.approx(tokens / expected["unmask"]["steps"], abs=0.006)

    shot = tmp_path / "playground-completion.png"
    page.screenshot(path=str(shot))
    _check_png(shot)


def test_a_policy_parameter_field_opens_with_its_policy_and_is_sent(page, server) -> None:
    """The factor policy's f: its field is closed until the policy is chosen, and then reaches the API."""
    _set_race(page, False)
    page.fill("#prompt", PROMPT)
    _settings(page, SETTINGS)
    assert page.is_disabled("#factor") and page.is_disabled("#threshold")
    page.select_option("#policy", "factor")
    assert page.is_enabled("#factor") and page.is_disabled("#threshold")
    page.fill("#factor", "2.5")
    _run(page)
    lane = _lane(page, server["diffusion"])
    assert lane.get_attribute("data-state") == "done", page.locator("#error").text_content()
    (request,) = page.posts
    sent = request.post_data_json
    assert sent["policy"] == "factor" and sent["factor"] == 2.5 and "threshold" not in sent
    body = {"model": server["diffusion"], "prompt": PROMPT, **SETTINGS, "policy": "factor", "factor": 2.5}
    assert lane.locator(".answer").text_content() == _api_text(server, "/v1/completions", body)["choices"][0]["text"]


def test_fill_in_the_middle_resolves_between_prefix_and_suffix(page, server, tmp_path: Path) -> None:
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    page.click("[data-mode=fim]")
    assert page.is_disabled("#race")  # AR models cannot infill: no race here
    page.fill("#fim-prefix", prefix)
    page.fill("#fim-suffix", suffix)
    _settings(page, SETTINGS)
    _run(page)
    lane = _lane(page, server["diffusion"])
    assert lane.get_attribute("data-state") == "done", page.locator("#error").text_content()
    assert int(lane.get_attribute("data-max-masked")) >= SETTINGS["max_tokens"] // 2

    expected = _api_text(server, "/v1/fim/completions",
                         {"model": server["diffusion"], "prompt": prefix, "suffix": suffix, **SETTINGS})
    assert lane.locator(".answer").text_content() == expected["choices"][0]["text"]
    assert lane.locator(".ctx-before").text_content() == prefix
    assert lane.locator(".ctx-after").text_content() == suffix
    shot = tmp_path / "playground-fim.png"
    lane.screenshot(path=str(shot))
    _check_png(shot)


def test_chat_keeps_the_conversation(page, server) -> None:
    _set_race(page, False)
    page.click("[data-mode=chat]")
    settings = {**SETTINGS, "max_tokens": 16, "steps": 8}
    _settings(page, settings)
    messages: list[dict] = []
    for turn in ("hello", "and once more"):
        page.fill("#chat-input", turn)
        _run(page)
        messages.append({"role": "user", "content": turn})
        expected = _api_text(server, "/v1/chat/completions", {"model": server["diffusion"], "messages": messages, **settings})
        answer = expected["choices"][0]["message"]["content"]
        assert _lane(page, server["diffusion"]).locator(".answer").text_content() == answer
        messages.append({"role": "assistant", "content": answer})
    bodies = page.locator("#chat-history .msg .msg-body").all_text_contents()
    assert bodies == [m["content"] for m in messages]


def test_race_runs_both_models_and_marks_a_winner(page, server, tmp_path: Path) -> None:
    _set_race(page, True)
    page.select_option("#model", server["diffusion"])
    page.select_option("#race-model", server["ar"])
    page.fill("#prompt", PROMPT)
    _settings(page, SETTINGS)
    _watch_masks(page)
    _run(page)
    assert page.locator("#lanes .lane").count() == 2
    seen = page.evaluate("window.seen.dom")
    for model in (server["diffusion"], server["ar"]):
        assert max(seen[model]) >= SETTINGS["max_tokens"] // 2, seen[model]  # both canvases started masked
        lane = _lane(page, model)
        assert lane.get_attribute("data-state") == "done", page.locator("#error").text_content()
        expected = _api_text(server, "/v1/completions", {"model": model, "prompt": PROMPT, **SETTINGS})
        assert lane.locator(".answer").text_content() == expected["choices"][0]["text"]
        counters = _counters(lane)
        assert float(counters["elapsed"].removesuffix(" s")) > 0 and float(counters["tps"]) > 0, counters
    assert page.locator("#lanes .badge.winner:visible").count() == 1
    _check_verdict(page, server)
    shot = tmp_path / "playground-race.png"
    page.screenshot(path=str(shot))
    _check_png(shot)


def test_server_errors_are_shown(page, server) -> None:
    _set_race(page, False)
    page.fill("#api-key", "sk-playground")
    page.fill("#prompt", PROMPT)
    _settings(page, {**SETTINGS, "temperature": 5})
    _run(page)
    assert page.posts[-1].headers["authorization"] == "Bearer sk-playground"
    response = httpx.post(server["base"] + "/v1/completions",
                          json={"model": server["diffusion"], "prompt": PROMPT, **SETTINGS, "temperature": 5})
    assert response.status_code == 400
    error = response.json()["error"]
    assert page.is_visible("#error")
    shown = page.locator("#error").text_content()
    assert error["message"] in shown and "400" in shown and error["type"] in shown
    assert _lane(page, server["diffusion"]).get_attribute("data-state") == "error"


def test_html_preview_runs_sandboxed(page, server) -> None:
    _set_race(page, False)
    document = "<!DOCTYPE html><html><body><p id=out>static</p><script>out.textContent = 'script ran'</script>\n"
    page.fill("#prompt", document)
    _settings(page, {**SETTINGS, "max_tokens": 8, "steps": 4})
    _run(page)
    lane = _lane(page, server["diffusion"])
    lane.locator(".preview-btn").click()
    frame = page.locator("#preview-frame")
    assert frame.get_attribute("sandbox") == "allow-scripts"
    assert page.frame_locator("#preview-frame").locator("#out").text_content(timeout=5_000) == "script ran"
    # An opaque origin: the generated page cannot reach the playground, nor the playground it.
    assert page.evaluate("document.querySelector('#preview-frame').contentDocument === null")


@pytest.fixture(scope="module")
def mute_server(tiny_model_dir: Path, tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A second server whose AR model ends every answer at once (its logits are all zero, so greedy
    decoding takes token 0, EOS), raced against the tiny diffusion model."""
    import torch

    from conftest import make_model_dir
    from unmask.models.io import load_model, save_model

    mute = make_model_dir(tmp_path_factory.mktemp("mute") / "an-ar-model-that-says-nothing", tiny_tokenizer, "causal")
    model = load_model(mute, device="cpu", dtype=torch.float32)
    assert model.config.eos_token_id == 0
    with torch.no_grad():
        model.norm.weight.zero_()
    save_model(model, mute)
    yield from _serve(tiny_model_dir, mute, tmp_path_factory)


def test_a_lane_that_writes_nothing_does_not_win(context, mute_server) -> None:
    page = context.new_page()
    page.goto(mute_server["base"] + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=15_000)
    _set_race(page, True)
    page.select_option("#model", mute_server["diffusion"])
    page.select_option("#race-model", mute_server["ar"])
    page.fill("#prompt", PROMPT)
    _settings(page, SETTINGS)
    _run(page)
    mute, diffusion = _lane(page, mute_server["ar"]), _lane(page, mute_server["diffusion"])
    assert mute.get_attribute("data-state") == "done" and mute.locator(".answer").text_content() == ""
    assert diffusion.get_attribute("data-state") == "done"
    assert page.locator("#lanes .badge.winner:visible").count() == 0 and page.locator("#lanes .lane.won").count() == 0
    assert mute.locator(".badge").text_content() == "not ranked · no text"
    assert diffusion.locator(".badge").text_content() == "no race · the other lane is not ranked"
    assert page.get_attribute("#lanes", "data-race-chars") is None
    assert sorted(_untruncated_names(page)) == sorted([mute_server["ar"], mute_server["diffusion"]])
    page.close()


def test_the_race_verdict_ranks_on_the_same_text(page) -> None:
    """raceVerdict on made-up lanes: a lane that stopped at once is not ranked; times are read at the common length."""
    verdicts = page.evaluate(
        """async () => {
          const { raceVerdict } = await import('/static/app.js');
          const lane = (name, text, points) => ({name, text, timeTo: (n) => {
            const hit = points.find(([, length]) => length >= n); return hit ? hit[0] : null; }});
          return [
            // the fast lane wrote less: compared at its length, where the other was ahead
            raceVerdict([lane('short', 'x'.repeat(20), [[0.2, 20]]), lane('long', 'y'.repeat(60), [[0.1, 30], [0.9, 60]])]),
            raceVerdict([lane('quick', 'ok', [[0.01, 2]]), lane('real', 'z'.repeat(40), [[0.5, 40]])]),
            raceVerdict([lane('blank', '  \\n ', [[0.01, 4]]), lane('real', 'z'.repeat(40), [[0.5, 40]])]),
          ];
        }"""
    )
    first, stopped, blank = verdicts
    assert first["chars"] == 20
    assert [v["won"] for v in first["verdicts"]] == [False, True]
    assert first["verdicts"][1]["badge"] == "winner · 2.0× faster to 20 chars"
    assert [v["seconds"] for v in first["verdicts"]] == [0.2, 0.1]
    assert stopped["chars"] is None and not any(v["won"] for v in stopped["verdicts"])
    assert stopped["verdicts"][0]["badge"] == "not ranked · stopped after 2 characters"
    assert blank["verdicts"][0]["badge"] == "not ranked · no text"
