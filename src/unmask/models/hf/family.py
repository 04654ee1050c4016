"""What unmask knows about one published checkpoint family, and how a ``config.json`` picks one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unmask.models.config import ModelConfig
from unmask.models.hf.config import HFConfig


@dataclass(frozen=True)
class Family:
    """A checkpoint layout: its config keys, its tensor names and its special tokens."""

    name: str  # short id recorded in ModelConfig.extra["hf_family"]
    title: str  # name used in messages and docs
    model_types: tuple[str, ...]  # config.json "model_type" values (compared lower-case)
    architectures: tuple[str, ...]  # config.json "architectures" entries
    model_config: Callable[[HFConfig], ModelConfig]  # config.json -> unmask's ModelConfig
    tensor_names: Callable[[ModelConfig], dict[str, str]]  # unmask parameter -> checkpoint tensor
    ignored: Callable[[str, ModelConfig], bool]  # checkpoint tensors that carry nothing unmask needs
    mask_tokens: tuple[str, ...] = ()  # [MASK] token strings tried when config.json names no id
    end_of_turn: tuple[str, ...] = ()  # token strings that close a chat turn (added to the stop ids)
    vocab_merges: bool = False  # may ship vocab.json + merges.txt (Qwen2 byte-level BPE) instead of tokenizer.json

    def matches(self, config: HFConfig) -> bool:
        return config.model_type.lower() in self.model_types or any(a in self.architectures for a in config.architectures)


def detect(config: HFConfig, families: tuple[Family, ...]) -> Family:
    """The family named by ``model_type``/``architectures``; an unknown one is a one-line error."""
    for family in families:
        if family.matches(config):
            return family
    known = ", ".join(f"{f.title} ({f.architectures[0]})" for f in families)
    raise config.fail(
        f"unknown architecture (model_type {config.model_type or None!r}, architectures {config.architectures}); "
        f"unmask loads {known}"
    )
