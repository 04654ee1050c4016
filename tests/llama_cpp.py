"""The llama.cpp binaries that ``scripts/build_llama_cpp.sh`` builds, for the cross-implementation tests.

Outside CI a missing build skips the test with the command that makes it; with
``UNMASK_REQUIRE_LLAMA_CPP=1`` (``.ci/run`` sets it) a missing build fails it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "llama-cpp-python==0.3.36"  # the sdist scripts/build_llama_cpp.sh builds
THREADS = os.environ.get("UNMASK_LLAMA_CPP_THREADS", "1")  # tiny models; a spare core lets the tools' log thread run


def build_dir() -> Path:
    return Path(os.environ.get("UNMASK_LLAMA_CPP", ROOT / ".cache" / "llama.cpp"))


def binary(name: str) -> Path:
    """Path of one llama.cpp binary of the pinned version; skips (or, in CI, fails) the test when absent."""
    path = build_dir() / "bin" / name
    stamp = build_dir() / "VERSION"
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == VERSION:
        return path
    reason = f"llama.cpp ({VERSION}) is not built at {build_dir()}: run scripts/build_llama_cpp.sh"
    if os.environ.get("UNMASK_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def run(name: str, *args: str, complete: Callable[[subprocess.CompletedProcess], bool], tries: int = 8) -> subprocess.CompletedProcess:
    """Run a llama.cpp binary with ``-t THREADS``; a non-zero exit fails the test with its stderr tail.

    Its tools print through an asynchronous logger that they do not flush before exiting, so the
    last lines are sometimes lost (seen here once in a few dozen runs): a run whose output is not
    ``complete`` is repeated (the runs are deterministic, so a repeat only recovers the lines).
    """
    cmd = [str(binary(name)), "-t", THREADS, *args]
    for _ in range(tries):
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        if complete(proc):
            return proc
    raise AssertionError(f"{' '.join(cmd)}: output incomplete in {tries} runs:\n{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}")


def diffusion(model: Path, prompt: str, *, canvas: int, steps: int, block: int, algorithm: int) -> str:
    """The text ``llama-diffusion-cli`` writes: greedy (``--top-k 1``), block schedule, on a canvas of ``canvas`` tokens."""
    proc = run(
        "llama-diffusion-cli", "-m", str(model), "-p", prompt, "-ub", str(canvas), "-b", str(canvas),
        "-c", str(canvas), "--diffusion-steps", str(steps), "--diffusion-block-length", str(block),
        "--diffusion-algorithm", str(algorithm), "--top-k", "1", "--temp", "0", "--seed", "0",
        "--no-log-prefix", "--no-log-timestamps", "--log-colors", "off",
        complete=lambda p: "\ntotal time:" in p.stderr and p.stderr.endswith("\n") and p.stderr.count("\n", p.stderr.rfind("total time:")) >= 3,
    )
    # It logs "total time: ..." after the last step, then "\n<text>\n" (to stderr).
    text = proc.stderr.rpartition("total time:")[2].split("\n", 1)[1]
    assert text.startswith("\n") and text.endswith("\n"), repr(text[-200:])
    return text[1:-1]


def completion(model: Path, prompt: str, n: int) -> tuple[str, bool]:
    """``llama-completion``'s greedy continuation of ``prompt`` (raw text, no chat template) of at most ``n``
    tokens, and whether it stopped at an end-of-generation token."""
    proc = run(
        "llama-completion", "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "--seed", "0",
        "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup", "-c", "512",
        complete=lambda p: "graphs reused" in p.stderr,  # the last line it logs
    )
    assert proc.stdout.endswith("\n\n"), repr(proc.stdout[-200:])  # it ends its output with an empty line
    out = proc.stdout[:-2]
    ended = out.endswith(" [end of text]\n")  # what it prints when the model ends the text
    return (out[: -len(" [end of text]\n")] if ended else out), ended
