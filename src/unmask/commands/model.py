"""``unmask info`` (what a model is) and ``unmask export`` (a model as llama.cpp's GGUF file)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from unmask.commands import command
from unmask.commands.flags import add_model, chosen_model
from unmask.models.config import AttentionMode


def setup_arg_parser(subparsers: argparse._SubParsersAction) -> None:
    command(subparsers, "info", "describe a model directory", add_info_arguments, main)
    command(subparsers, "export", "write a model as a GGUF file that llama.cpp runs", add_export_arguments, main)


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, positional=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, positional=True)
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the file to write")
    p.add_argument("--dtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32", help="weight type (norms stay f32)")


def main(args: argparse.Namespace) -> None:
    (info if args.command == "info" else export)(args)


def info(args: argparse.Namespace) -> None:
    from unmask.loading import load

    loaded = load(chosen_model(args), device="cpu")
    cfg = loaded.model.config
    facts = {
        "path": str(loaded.path),
        "parameters": loaded.model.num_params(),
        "attention": cfg.attention,
        "layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "heads": f"{cfg.n_heads} query / {cfg.n_kv_heads} key-value",
        "context": cfg.max_seq_len,
        "vocab": cfg.vocab_size,
        "mask_token_id": cfg.mask_token_id,
        "eos_token_id": cfg.eos_token_id,
        "shifted_logits": cfg.shifted,
        "training": _portable(loaded.training),
    }
    if cfg.attention == AttentionMode.BLOCK:
        facts["block_size"] = cfg.block_size
    if args.json:
        print(json.dumps(facts, indent=2))
        return
    for key, value in _flat(facts):
        print(f"{key}: {value}")


def export(args: argparse.Namespace) -> None:
    from unmask.models.gguf.write import export_model

    print("\n".join(export_model(chosen_model(args), args.gguf, args.dtype)))


def _portable(record: Any) -> Any:
    """A training record without the training machine's absolute paths (they name nothing here)."""
    if isinstance(record, dict):
        return {k: _portable(v) for k, v in record.items() if not _absolute_path(v)}
    if isinstance(record, list):
        return [_portable(v) for v in record if not _absolute_path(v)]
    return record


def _absolute_path(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith(("/", "~")) or (len(value) > 2 and value[1:3] in (":\\", ":/")))


def _flat(facts: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested records as ``a.b.c: value`` lines."""
    out: list[tuple[str, Any]] = []
    for key, value in facts.items():
        if isinstance(value, dict) and value:
            out += _flat(value, f"{prefix}{key}.")
        elif not isinstance(value, dict):
            out.append((f"{prefix}{key}", value))
    return out
