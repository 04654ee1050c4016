"""Loading a model directory (unmask's own or a published checkpoint, or the embedded default) with its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unmask.errors import UnmaskError
from unmask.files import read_json_object
from unmask.hub import resolve_model
from unmask.models.delta import is_delta_dir, load_delta
from unmask.models.gguf import load_gguf
from unmask.models.hf import is_hf_checkpoint, load_hf
from unmask.models.io import load_model
from unmask.models.transformer import Transformer
from unmask.tokenizer import Tokenizer

if TYPE_CHECKING:
    from unmask.decoding.defaults import DecodingChoice


def default_model_dir(name: str = "default") -> Path:
    """A model shipped inside the package: ``default`` (the adapted SmolLM2 coder, a delta over the
    installed base, used when no model is named), or the tiny CPU pair ``coder-nano-cpu`` and
    ``coder-nano-cpu-ar``."""
    return Path(str(resources.files("unmask") / "assets" / name))


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    path: Path

    @property
    def decoding(self) -> "DecodingChoice":
        """The decoding setting measured best for this model (``decoding.json``), if it ships one."""
        from unmask.decoding.defaults import read_model_choice

        return read_model_choice(self.path)

    @property
    def training(self) -> dict[str, Any]:
        """The training record written beside the weights (empty when there is none)."""
        record = self.path / "training.json"
        if not record.is_file():
            return {}
        try:
            return read_json_object(record)
        except UnmaskError:  # a damaged record only informs: the model still loads
            return {}


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UnmaskError(f"unknown device {device!r} ({exc})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UnmaskError(f"device {device!r} requested but no CUDA device is available")
    return resolved


def load(
    path: str | Path | None = None, device: str | None = "auto", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Model + tokenizer from a model directory, GGUF file or name (``hub.resolve_model``); ``None``: the embedded model.

    The directory is unmask's own format (``config.json`` with ``"model_type": "unmask"``) or a
    published checkpoint in its Hugging Face layout (LLaDA, Dream, Fast-dLLM v2, SDAR; see
    ``unmask.models.hf``); a GGUF file is llama.cpp's format (``unmask.models.gguf``), its
    quantised tensors dequantised. Weights keep their stored dtype unless ``dtype`` is given (e.g.
    ``torch.bfloat16``), except that on the CPU everything is widened to float32, which is both
    faster there and exact; a GGUF file on a GPU becomes bfloat16.
    """
    directory = default_model_dir() if path is None else resolve_model(path)
    device_ = resolve_device(device)
    if dtype is None and device_.type == "cpu":
        dtype = torch.float32
    if directory.is_file():
        model, tokenizer = load_gguf(directory, device=device_, dtype=dtype or torch.bfloat16)
    elif not directory.is_dir():
        raise UnmaskError(f"{directory}: model directory not found")
    elif is_delta_dir(directory):  # an adapted model stored as its changes over a base
        model, tokenizer = load_delta(directory, device=device_, dtype=dtype), Tokenizer.from_dir(directory)
    elif is_hf_checkpoint(directory):
        model, tokenizer = load_hf(directory, device=device_, dtype=dtype)
    else:
        model = load_model(directory, device=device_, dtype=dtype)
        tokenizer = Tokenizer.from_dir(directory)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UnmaskError(
            f"{directory}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    if tokenizer.vocab_size < model.config.vocab_size:  # padded embeddings (LLaDA, Qwen): never predict those rows
        model.config.usable_vocab = tokenizer.vocab_size
    return LoadedModel(model=model, tokenizer=tokenizer, path=directory)
