"""Published checkpoint layouts behind `unmask serve --cache dual`: chat with the checkpoint's own
template and stop ids, answered as the library's cached decoder answers (exactly the uncached one
for the block-causal families)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

import hf_fixtures as fx
from test_serve import free_port
from unmask.decoding import GenerationConfig, generate
from unmask.loading import load

MESSAGES = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "def add(a, b):"}]


@pytest.mark.parametrize("family", fx.FAMILIES)
def test_chat_completions_on_a_published_layout(family, tmp_path):
    directory = fx.write_checkpoint(tmp_path / family, family, shards=2)
    loaded = load(directory, device="cpu")
    tok, mc = loaded.tokenizer, loaded.model.config
    block = mc.block_size if mc.attention == "block" else 4
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unmask", "serve", str(directory), "--served-model-name", family, "--port", str(port),
         "--device", "cpu", "--log-level", "warning", "--cache", "dual"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(
            model=family, messages=MESSAGES, max_tokens=2 * block, temperature=0,
            extra_body={"steps": block, "block_size": block, "policy": "confidence"},
        )
        ids = tok.encode_chat(MESSAGES)
        assert reply.usage.prompt_tokens == len(ids)  # the checkpoint's own template, rendered the same way
        config = GenerationConfig(max_new_tokens=2 * block, steps=block, block_size=block, policy="confidence",
                                  stop_ids=tuple(sorted(tok.stop_ids)), cache="dual")  # the server's --cache dual
        expected = generate(loaded.model, [ids], config)
        assert reply.choices[0].message.content == tok.decode(expected.sequences[0])
        assert reply.choices[0].finish_reason == expected.finish_reasons[0]
        stream = client.chat.completions.create(
            model=family, messages=MESSAGES, max_tokens=2 * block, temperature=0, stream=True,
            extra_body={"steps": block, "block_size": block, "policy": "confidence", "diffusing": True},
        )
        chunks = list(stream)
        canvases = [c.choices[0].model_extra["canvas"] for c in chunks if c.choices and "canvas" in (c.choices[0].model_extra or {})]
        assert canvases and canvases[-1]["masked"] == 0
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_padding_rows_past_the_tokenizer_are_never_predicted(tmp_path):
    """Published models pad their embeddings past the tokenizer (LLaDA 126464 rows for 126349 ids)."""
    import torch

    loaded = load(fx.write_checkpoint(tmp_path, "dream"), device="cpu")
    model, usable = loaded.model, loaded.tokenizer.vocab_size
    assert model.config.vocab_size > usable and model.config.usable_vocab == usable
    with torch.no_grad():
        model.head.weight[usable:] *= 100.0  # the padding rows would win every position
    result = generate(model, [loaded.tokenizer.encode("def f():")], GenerationConfig(max_new_tokens=8, block_size=None))
    assert result.sequences[0] and all(t < usable for t in result.sequences[0])
