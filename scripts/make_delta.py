"""Store an adapted model as a (low-rank) delta over the base it was adapted from.

    python scripts/make_delta.py runs/smollm2-coder/final --base smollm2-135m --rank 64 \
        --out src/unmask/assets/smollm2-coder

Writes config.json, base.json (base name, its SHA-256, per-matrix truncation errors),
delta.safetensors (bf16) and the tokenizer and records of the model directory (training.json,
decoding.json, MODEL_CARD.md when present), then loads the result back and prints how far its
logits are from the full model's on a few code prompts.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

import unmask
from unmask.errors import UnmaskError
from unmask.hub import resolve_model
from unmask.models.delta import DELTA_NAME, save_delta
from unmask.models.io import load_model
from unmask.tokenizer import Tokenizer

COPIED = ("tokenizer.json", "tokenizer_config.json", "training.json", "decoding.json", "MODEL_CARD.md")
PROMPTS = ("def is_prime(n):\n", "import os\n\nclass Config:\n    def __init__(self, path):", "for i in range(10):")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the adapted model directory (a run's final/ or one of its checkpoints)")
    parser.add_argument("--base", required=True, help="the model it was adapted from (a name, directory or .gguf)")
    parser.add_argument("--name", help="the base's name to record, resolved when loading (default: --base)")
    parser.add_argument("--tokenizer", help="directory of the tokenizer files (default: the model directory)")
    parser.add_argument("--rank", type=int, help="store changed matrices as rank-r factors (default: whole)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="of the stored matrices and factors (norms stay float32); float16 keeps 3 more mantissa "
                             "bits than bfloat16 at the same size (default: float16)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, dtype=torch.float32)
    tokenizer_dir = Path(args.tokenizer or args.model)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    base = unmask.load(args.base, device="cpu")
    out = Path(args.out)
    record = save_delta(model, args.name or args.base, resolve_model(args.base), base.model.state_dict(), out,
                        dtype=getattr(torch, args.dtype), rank=args.rank)
    for name in COPIED:
        for source in (Path(args.model), tokenizer_dir):
            if (source / name).is_file():
                shutil.copy(source / name, out / name)
                break
    errors = record["truncation_error"]
    print(f"{out / DELTA_NAME}: {(out / DELTA_NAME).stat().st_size / 2**20:.1f} MiB, {len(record['changed'])} changed "
          f"tensors, {record['unchanged']} from the base")
    if errors:
        print(f"rank {args.rank}: truncation error median {sorted(errors.values())[len(errors) // 2]:.3f}, "
              f"max {max(errors.values()):.3f}")
    try:
        shipped = unmask.load(out, device="cpu")
    except UnmaskError as exc:  # e.g. the base's recorded name does not resolve on this machine
        print(f"not checked: {exc}")
        return
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            full, small = model(ids), shipped.model(ids)
            agree = float((full.argmax(-1) == small.argmax(-1)).float().mean())
            print(f"{prompt[:30]!r}: max |logit diff| {float((full - small).abs().max()):.3f}, argmax agreement {agree:.0%}")


if __name__ == "__main__":
    main()
