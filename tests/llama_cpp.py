"""The llama.cpp binaries that ``scripts/build_llama_cpp.sh`` builds, for the cross-implementation tests.

Outside CI a missing build skips the test with the command that makes it; with
``UNMASK_REQUIRE_LLAMA_CPP=1`` (``.ci/run`` sets it) a missing build fails it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERSION = "llama-cpp-python==0.3.36"  # the sdist scripts/build_llama_cpp.sh builds
THREADS = os.environ.get("UNMASK_LLAMA_CPP_THREADS", "2")  # the CI machine has 2 cores


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


def run(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a llama.cpp binary with ``-t THREADS``; a non-zero exit fails the test with its stderr tail."""
    cmd = [str(binary(name)), "-t", THREADS, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def diffusion(model: Path, prompt: str, *, canvas: int, steps: int, block: int, algorithm: int) -> str:
    """The text ``llama-diffusion-cli`` writes: greedy (``--top-k 1``), block schedule, on a canvas of ``canvas`` tokens."""
    proc = run(
        "llama-diffusion-cli", "-m", str(model), "-p", prompt, "-ub", str(canvas), "-b", str(canvas),
        "-c", str(canvas), "--diffusion-steps", str(steps), "--diffusion-block-length", str(block),
        "--diffusion-algorithm", str(algorithm), "--top-k", "1", "--temp", "0", "--seed", "0",
        "--no-log-prefix", "--no-log-timestamps", "--log-colors", "off",
    )
    # It logs "total time: ..." after the last step, then "\n<text>\n" (to stderr).
    _, marker, rest = proc.stderr.rpartition("total time:")
    assert marker, f"no output from llama-diffusion-cli:\n{proc.stderr[-3000:]}"
    text = rest.split("\n", 1)[1]
    assert text.startswith("\n") and text.endswith("\n"), repr(text[-200:])
    return text[1:-1]


def completion(model: Path, prompt: str, n: int) -> str:
    """``llama-completion``'s greedy continuation of ``prompt`` (raw text, no chat template), ``n`` tokens."""
    proc = run(
        "llama-completion", "-m", str(model), "-p", prompt, "-n", str(n), "--temp", "0", "--seed", "0",
        "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup", "-c", "512",
    )
    out = proc.stdout
    assert out.endswith("\n\n"), repr(out[-200:])  # it ends its output with an empty line
    return out[:-2]
