"""Load a published checkpoint directory into unmask's own ``Transformer``.

config.json -> family -> ``ModelConfig``; tokenizer -> special ids; safetensors headers checked
against the config; a model built on the ``meta`` device, allocated once on the target device in
the target dtype, and filled tensor by tensor. Nothing from the directory is imported or executed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from unmask.errors import UnmaskError
from unmask.files import read_json
from unmask.models.config import ModelConfig
from unmask.models.hf.config import CONFIG_NAME, HFConfig
from unmask.models.hf.family import Family, detect
from unmask.models.hf.llada import LLADA
from unmask.models.hf.qwen import DREAM, FAST_DLLM, SDAR
from unmask.models.hf.tokenizer import load_tokenizer
from unmask.models.hf.weights import FLOAT_DTYPES, check, copy_into, read_headers, weight_files
from unmask.models.transformer import Transformer
from unmask.tokenizer import Tokenizer

FAMILIES: tuple[Family, ...] = (LLADA, DREAM, FAST_DLLM, SDAR)


def is_hf_checkpoint(directory: Path) -> bool:
    """True when ``config.json`` names a published architecture rather than unmask's own format."""
    try:
        data = read_json((directory / CONFIG_NAME))
    except UnmaskError:
        return False  # the native loader reports the problem
    if not isinstance(data, dict) or data.get("model_type") == "unmask":
        return False
    return "model_type" in data or "architectures" in data


def hf_model_config(directory: Path) -> tuple[Family, HFConfig, ModelConfig]:
    """The family of a checkpoint and its ``ModelConfig`` (special ids as far as config.json gives them)."""
    cfg = HFConfig.read(directory / CONFIG_NAME)
    family = detect(cfg, FAMILIES)
    try:
        config = family.model_config(cfg)
    except UnmaskError as exc:
        raise exc if str(cfg.path) in str(exc) else cfg.fail(str(exc)) from None
    config.extra = {"hf_family": family.name, "hf_model_type": cfg.model_type, "hf_architectures": cfg.architectures}
    return family, cfg, config


def materialise(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Give every parameter of a meta-device model uninitialised storage on ``device`` in ``dtype``."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device))


def load_hf(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of a published checkpoint; ``dtype`` None keeps the stored dtype."""
    directory = Path(directory)
    family, cfg, config = hf_model_config(directory)
    tokenizer = load_tokenizer(directory, family, config)
    try:
        config.validate()
    except UnmaskError as exc:
        raise cfg.fail(str(exc)) from None
    names = family.tensor_names(config)
    with torch.device("meta"):
        model = Transformer(config)
    params = dict(model.named_parameters())
    if set(names) != set(params):  # a mapping that misses a parameter is a bug in unmask, not in the checkpoint
        raise RuntimeError(f"{family.title} mapping does not cover {sorted(set(params) ^ set(names))}")
    expected = {names[n]: tuple(p.shape) for n, p in params.items()}
    source = weight_files(directory)
    tensors = read_headers(source)
    check(tensors, expected, {n for n in tensors if family.ignored(n, config)}, directory)
    if dtype is None:
        dtype = FLOAT_DTYPES[tensors[names["embed.weight"]].dtype]
    materialise(model, device, dtype)
    if config.tie_embeddings:
        model.head.weight = model.embed.weight
    for name, param in model.named_parameters():
        copy_into(param, names[name], tensors[names[name]])
    return model.eval(), tokenizer
