"""The `unmask` command, run as a real subprocess: clean stdout, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unmask.models.io import WEIGHTS_NAME


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unmask", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    message = lines[-1]
    assert message.startswith("unmask: error:") or message.startswith("unmask "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_generate_writes_only_the_completion_to_stdout(tiny_model_dir: Path) -> None:
    args = ("generate", "def add(a, b):", "--model", str(tiny_model_dir), "--max-new-tokens", "16", "--steps", "4")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") >= 1
    assert "NFE" in proc.stderr and "tokens/forward" in proc.stderr
    again = run_cli(*args, "--quiet")
    assert again.stdout == proc.stdout  # deterministic for a fixed seed
    assert again.stderr == ""


def test_generate_reads_the_prompt_from_stdin(tiny_model_dir: Path) -> None:
    flags = ("--model", str(tiny_model_dir), "--max-new-tokens", "8", "--quiet")
    piped = run_cli("generate", *flags, stdin="def fib(n):")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == run_cli("generate", "def fib(n):", *flags).stdout


def test_show_steps_animates_on_stderr_and_keeps_stdout_clean(tiny_model_dir: Path) -> None:
    base = ("--model", str(tiny_model_dir), "--max-new-tokens", "16", "--steps", "8", "--block-size", "16")
    plain = run_cli("generate", "for i in", *base)
    shown = run_cli("generate", "for i in", *base, "--show-steps", env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"})
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == plain.stdout
    assert "░" in shown.stderr  # masked placeholders were drawn
    assert "step 8" in shown.stderr  # one frame per denoising step
    assert "\x1b[" in shown.stderr  # redrawn in place with cursor movements


def test_infill_prints_only_the_middle(tiny_model_dir: Path) -> None:
    proc = run_cli(
        "infill", "--prefix", "def add(a, b):\n    return ", "--suffix", "\n",
        "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert "def add" not in proc.stdout


def test_info_describes_a_model(tiny_model_dir: Path) -> None:
    proc = run_cli("info", str(tiny_model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["attention"] == "bidirectional" and facts["layers"] == 2 and facts["parameters"] > 0


def test_missing_model_directory_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run_cli("generate", "x", "--model", str(tmp_path / "nope"))
    assert_one_line_error(proc, 1, "model directory not found")


def test_corrupt_weights_are_a_one_line_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == WEIGHTS_NAME else data)
    proc = run_cli("generate", "x", "--model", str(broken))
    assert_one_line_error(proc, 1, WEIGHTS_NAME)


def test_config_missing_a_key_is_a_one_line_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    broken = tmp_path / "bad-config"
    broken.mkdir()
    for f in tiny_model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["d_model"] = 48  # weights no longer match the config
    (broken / "config.json").write_text(json.dumps(config))
    proc = run_cli("info", str(broken))
    assert_one_line_error(proc, 1, "shape")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (("--temperature", "-1"), "--temperature"),
        (("--max-new-tokens", "0"), "--max-new-tokens"),
        (("--top-p", "0"), "--top-p"),
        (("--policy", "telepathy"), "--policy"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(flags: tuple[str, ...], needle: str, tiny_model_dir: Path) -> None:
    proc = run_cli("generate", "x", "--model", str(tiny_model_dir), *flags)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and needle in proc.stderr.splitlines()[-1]


def test_prompt_longer_than_the_context_is_a_one_line_error(tiny_model_dir: Path) -> None:
    proc = run_cli("generate", "def f(x): return x\n" * 60, "--model", str(tiny_model_dir))
    assert_one_line_error(proc, 1, "max_seq_len")


def test_tokenizer_train_writes_a_loadable_tokenizer(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    (src / "blob.py").write_bytes(b"\x00\x01binary")
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", str(src), "--out", str(out), "--vocab-size", "320")
    assert proc.returncode == 0, proc.stderr
    from unmask.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(out)
    assert tok.decode(tok.encode("def f3(x):")) == "def f3(x):"


def test_help_and_version_import_no_torch() -> None:
    for flag in ("--help", "--version"):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "unmask", flag], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert "unmask.cli" in imported and "torch" not in imported and "numpy" not in imported, flag


def test_every_option_is_described_and_shows_its_default() -> None:
    import argparse

    from unmask.cli import build_parser
    from unmask.decoding.defaults import DEFAULT_BLOCK
    from unmask.decoding.policies import POLICIES

    undescribed = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        assert parser.description, f"{path}: no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help:
                undescribed.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(complete=True), "unmask")
    assert not undescribed, undescribed
    text = run_cli("generate", "--help", env={"COLUMNS": "400"}).stdout
    assert "length of the canvas (default: 64)" in text
    assert "(default: 0.0)" in text and "(default: None)" not in text and "(default: False)" not in text
    assert f"else {DEFAULT_BLOCK})" in text and ", ".join(POLICIES) in text
    assert "1,2,4,8" in run_cli("bench", "--help", env={"COLUMNS": "400"}).stdout


def test_info_leaves_out_the_training_machines_absolute_paths(tmp_path: Path, tiny_model_dir: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    record = {"steps": 7, "config": {"train": {"out_dir": "/home/someone/runs/x", "seed": 3},
                                     "data": {"shards": "runs/data", "paths": ["/srv/corpus", "rel/src"]}}}
    (model / "training.json").write_text(json.dumps(record))
    text = run_cli("info", str(model), env={"OMP_NUM_THREADS": "1"})
    assert text.returncode == 0, text.stderr
    assert "/home/someone" not in text.stdout and "/srv/corpus" not in text.stdout
    assert "training.config.train.seed: 3" in text.stdout and "training.config.data.shards: runs/data" in text.stdout
    facts = json.loads(run_cli("info", str(model), "--json", env={"OMP_NUM_THREADS": "1"}).stdout)
    assert facts["training"]["config"] == {"train": {"seed": 3}, "data": {"shards": "runs/data", "paths": ["rel/src"]}}
