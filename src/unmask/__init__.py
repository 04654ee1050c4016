"""unmask: diffusion language models: train, decode, serve and measure them.

``unmask.load(path)`` returns a model and its tokenizer from a model directory (the embedded
default model when no path is given); the rest lives in the subpackages that docs/architecture.md
describes (models, decoding, engine, serve, train, eval).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":  # imported lazily so `unmask --version` does not import torch
        from unmask.loading import load

        return load
    raise AttributeError(f"module 'unmask' has no attribute {name!r}")
