"""`unmask chat`, run as a real subprocess: piped turns, history, /reset, truncation, stop tokens, a terminal.

Each prompt the chat reports (``--json``) is checked against the chat template rendered
independently from the conversation seen so far.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_model_dir
from unmask.decoding import GenerationConfig, decode
from unmask.loading import load
from unmask.models.io import load_model, save_model
from unmask.tokenizer import IM_END, Tokenizer

FAST = ("--max-new-tokens", "16", "--steps", "4")


def chat(model: Path | str, *lines: str, flags: tuple[str, ...] = FAST, json_out: bool = True) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "unmask", "chat", str(model), *flags, *(["--json"] if json_out else [])]
    return subprocess.run(args, input="".join(line + "\n" for line in lines), capture_output=True, text=True, timeout=120)


def records(proc: subprocess.CompletedProcess) -> list[dict]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_every_turn_answers_and_the_next_prompt_holds_the_exchanges(tiny_model_dir: Path) -> None:
    system = "Be terse."  # short turns: the tiny tokenizer spends about a token per character of English
    turns = ["def f", "x = 1", "if x"]
    proc = chat(tiny_model_dir, *turns, flags=("--max-new-tokens", "4", "--steps", "2", "--system", system))
    assert proc.returncode == 0, proc.stderr
    got = records(proc)
    assert [r["turn"] for r in got] == [1, 2, 3]
    tok = Tokenizer.from_dir(tiny_model_dir)
    history = [{"role": "system", "content": system}]
    for text, record in zip(turns, got):
        assert record["dropped_exchanges"] == 0 and record["nfe"] >= 1
        assert record["prompt_tokens"] == len(tok.encode_chat(history + [user(text)]))
        history += [user(text), assistant(record["answer"])]
    assert got[0]["prompt_tokens"] < got[1]["prompt_tokens"] < got[2]["prompt_tokens"]


def test_reset_clears_the_history_and_unknown_commands_are_not_sent(tiny_model_dir: Path) -> None:
    lines = ("def add(a, b):", "/reset", "/frobnicate", "", "def add(a, b):", "/exit", "never read")
    proc = chat(tiny_model_dir, *lines, json_out=False)
    assert proc.returncode == 0, proc.stderr
    half = len(proc.stdout) // 2  # plain mode: each answer and a newline; the same prompt and seed twice
    assert proc.stdout.endswith("\n") and proc.stdout[:half] == proc.stdout[half:]
    fresh = len(Tokenizer.from_dir(tiny_model_dir).encode_chat([user("def add(a, b):")]))
    assert proc.stderr.count(f"prompt {fresh} tokens ·") == 2  # the statistics line of each turn
    assert "history cleared" in proc.stderr and "unknown command /frobnicate" in proc.stderr


def test_a_long_history_drops_the_fewest_oldest_exchanges(tiny_model_dir: Path) -> None:
    new_tokens = 16
    turns = [f"def f{i}(x): return x * {i}" for i in range(8)]
    proc = chat(tiny_model_dir, *turns, flags=("--max-new-tokens", str(new_tokens), "--steps", "8"))
    assert proc.returncode == 0, proc.stderr
    got = records(proc)
    assert len(got) == len(turns)
    tok = Tokenizer.from_dir(tiny_model_dir)
    budget = 128 - new_tokens  # the fixture's context (max_seq_len) minus the answer's canvas
    history: list[list[dict]] = []  # exchanges still kept
    for text, record in zip(turns, got):
        dropped = record["dropped_exchanges"]
        prompt = [m for ex in history[dropped:] for m in ex] + [user(text)]
        assert record["prompt_tokens"] == len(tok.encode_chat(prompt)) <= budget
        if dropped:  # keeping one more exchange would not have fitted
            one_more = [m for ex in history[dropped - 1 :] for m in ex] + [user(text)]
            assert len(tok.encode_chat(one_more)) > budget
        history = history[dropped:] + [[user(text), assistant(record["answer"])]]
    assert any(r["dropped_exchanges"] > 0 for r in got)  # the history outgrew the context
    assert any(r["dropped_exchanges"] == 0 for r in got[1:])  # ... but not before it had to
    assert "oldest exchange" in proc.stderr and "context of 128 tokens" in proc.stderr


def test_a_message_too_long_for_the_context_fails_alone(tiny_model_dir: Path) -> None:
    proc = chat(tiny_model_dir, "def add(a, b):", "x = 1; " * 200, "import os")
    assert proc.returncode == 1
    assert [r["turn"] for r in records(proc)] == [1, 2]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("unmask: error:")]
    assert len(errors) == 2 and "context leaves room for" in errors[0] and "1 turn failed" in errors[1]


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    proc = chat(tmp_path / "absent", "hello")
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"unmask: error: {tmp_path / 'absent'}: model directory not found"]


def end_of_turn_model(directory: Path, tokenizer: Tokenizer) -> Path:
    """A model that predicts <|im_end|> everywhere: embeddings carry a constant direction to the head."""
    make_model_dir(directory, tokenizer)
    model = load_model(directory)
    with torch.no_grad():
        for layer in model.layers:  # the residual stream stays the token embedding
            layer.attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed.weight[:, 0] = 1.0
        model.norm.weight.zero_()
        model.norm.weight[0] = 1.0
        model.head.weight.zero_()
        model.head.weight[tokenizer.token_id(IM_END), 0] = 10.0
    save_model(model, directory)
    return directory


def test_the_end_of_turn_token_ends_an_answer(tmp_path: Path, tiny_tokenizer: Tokenizer) -> None:
    model = end_of_turn_model(tmp_path / "eot", tiny_tokenizer)
    flags = ("--max-new-tokens", "16", "--block-size", "16")
    (record,) = records(chat(model, "def add(a, b):", flags=flags))
    assert (record["finish_reason"], record["answer"], record["completion_tokens"]) == ("stop", "", 0)
    assert record["nfe"] < 16  # stopped early instead of filling the canvas
    loaded = load(model, device="cpu")  # without the chat's stop ids the canvas fills up
    ids = tiny_tokenizer.encode_chat([user("def add(a, b):")])
    plain = decode(loaded.model, [ids], GenerationConfig(max_new_tokens=16, block_size=16))
    assert plain.finish_reasons == ["length"] and plain.nfe == 16


def read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not seen; got {bytes(seen)[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                raise AssertionError(f"{needle!r} not seen before exit; got {bytes(seen)[-400:]!r}") from None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pseudo-terminal test")
def test_terminal_ctrl_c_stops_an_answer_and_ctrl_d_quits(tiny_model_dir: Path) -> None:
    master, slave = pty.openpty()
    slow = ("--max-new-tokens", "16", "--block-size", "16", "--show-steps", "--frame-delay", "0.5")
    proc = subprocess.Popen(
        [sys.executable, "-m", "unmask", "chat", str(tiny_model_dir), *slow],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"},
        # as from a terminal: a suite started in the background by a non-interactive shell
        # inherits SIGINT ignored, and so would the chat
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(slave)
    seen = bytearray()
    try:
        read_until(master, b">>> ", seen)
        os.write(master, b"def add(a, b):\n")
        read_until(master, b"step 1", seen)  # the live view is drawing
        proc.send_signal(signal.SIGINT)
        read_until(master, b"(answer stopped)", seen)
        del seen[: seen.index(b"(answer stopped)")]  # the prompt may already have arrived in the same read
        read_until(master, b">>> ", seen)  # back at the prompt
        os.write(master, b"\x04")  # Ctrl-D on an empty line
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.mark.parametrize("family, repo_id", [("llada", "GSAI-ML/LLaDA-8B-Instruct"), ("dream", "Dream-org/Dream-v0-Instruct-7B")])
def test_chat_with_a_published_checkpoint_by_its_cached_name(
    family: str, repo_id: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from hf_fixtures import write_checkpoint

    from unmask.cli import main

    home = tmp_path / "home"
    directory = write_checkpoint(home / "models" / repo_id.replace("/", "--"), family, shards=2)
    monkeypatch.setenv("UNMASK_HOME", str(home))
    assert main(["list", "--json"]) == 0
    entry = {e["name"]: e for e in json.loads(capsys.readouterr().out)}[repo_id]
    assert (entry["family"], entry["attention"], entry["status"]) == (family, "bidirectional", "ok")

    turns = ["Hello world!", "What is the capital of France?"]
    proc = chat(repo_id, *turns, flags=("--max-new-tokens", "8", "--steps", "4"))
    assert proc.returncode == 0, proc.stderr
    tok = load(directory, device="cpu").tokenizer  # the checkpoint's own template and special tokens
    history: list[dict] = []
    for text, record in zip(turns, records(proc)):
        assert record["prompt_tokens"] == len(tok.encode_chat(history + [user(text)]))
        history += [user(text), assistant(record["answer"])]
