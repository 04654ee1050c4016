"""Peak host memory of loading a published-layout checkpoint, against the checkpoint's size.

Writes a scaled-down LLaDA-layout checkpoint (bfloat16, several shards + index, tokenizer) to a
temporary directory, then loads it with ``unmask.load`` in a fresh Python process and reports
that process's peak resident set (``VmHWM`` in /proc/self/status) before and after loading:

    python scripts/load_memory.py                 # ~1 GB in 4 shards
    python scripts/load_memory.py --gb 0.5 --shards 3 --naive

``--naive`` also measures the usual alternative (``safetensors.torch.load_file`` on every shard,
then ``load_state_dict``) in its own fresh process, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers

D_MODEL, MLP, HEADS, VOCAB = 1024, 3072, 16, 32768  # LLaDA-8B's proportions (4096, 12288, 32, 126464) / 4
SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

# Peak and current resident set of this process from /proc (VmHWM, VmRSS). Unlike ru_maxrss, which
# Linux carries over from the parent across fork + exec, VmHWM starts afresh in the new process.
PROC = r"""
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
"""

MEASURE = PROC + r"""
import json, sys, time
import torch
from unmask.loading import load
before = rss("VmHWM")
started = time.perf_counter()
loaded = load(sys.argv[1], device="cpu", dtype=torch.bfloat16)
seconds = time.perf_counter() - started
model = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
print(json.dumps({"before": before, "peak": rss("VmHWM"), "model": model, "seconds": seconds}))
"""

NAIVE = PROC + r"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file
from unmask.models.hf import hf_model_config, FAMILIES
from unmask.models.transformer import Transformer
before = rss("VmHWM")
directory = Path(sys.argv[1])
family, _, config = hf_model_config(directory)
state = {}
for shard in sorted(directory.glob("*.safetensors")):
    state.update(load_file(shard))
names = family.tensor_names(config)
model = Transformer(config).to(torch.bfloat16)
model.load_state_dict({ours: state[theirs] for ours, theirs in names.items()})
print(json.dumps({"before": before, "peak": rss("VmHWM")}))
"""


def layers_for(gigabytes: float) -> int:
    per_layer = 4 * D_MODEL * D_MODEL + 3 * D_MODEL * MLP
    embed = 2 * VOCAB * D_MODEL
    return max(1, round((gigabytes * 1e9 / 2 - embed) / per_layer))


def write_checkpoint(directory: Path, n_layers: int, shards: int) -> int:
    """LLaDA layout in bfloat16, written shard by shard; returns the bytes of weights written."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(sorted(pre_tokenizers.ByteLevel.alphabet()))
    backend.add_special_tokens(list(SPECIALS))
    backend.save(str(directory / "tokenizer.json"))
    ids = {t: backend.token_to_id(t) for t in SPECIALS}
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu", "block_type": "llama",
        "d_model": D_MODEL, "n_layers": n_layers, "n_heads": HEADS, "n_kv_heads": HEADS, "mlp_hidden_size": MLP,
        "mlp_ratio": 4, "vocab_size": VOCAB, "embedding_size": VOCAB, "max_sequence_length": 4096,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "weight_tying": False, "include_bias": False,
        "include_qkv_bias": False, "layer_norm_type": "rms", "mask_token_id": ids["<|mdm_mask|>"],
        "eos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    p = "model.transformer."
    shapes = {f"{p}wte.weight": (VOCAB, D_MODEL), f"{p}ln_f.weight": (D_MODEL,), f"{p}ff_out.weight": (VOCAB, D_MODEL)}
    for i in range(n_layers):
        b = f"{p}blocks.{i}."
        shapes.update({
            f"{b}attn_norm.weight": (D_MODEL,), f"{b}ff_norm.weight": (D_MODEL,),
            **{f"{b}{n}_proj.weight": (D_MODEL, D_MODEL) for n in "qkv"}, f"{b}attn_out.weight": (D_MODEL, D_MODEL),
            f"{b}ff_proj.weight": (MLP, D_MODEL), f"{b}up_proj.weight": (MLP, D_MODEL), f"{b}ff_out.weight": (D_MODEL, MLP),
        })
    names = list(shapes)
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: torch.empty(shapes[n], dtype=torch.bfloat16).uniform_(-0.02, 0.02) for n in names[k * per_shard : (k + 1) * per_shard]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * 2 for t in part.values())
        del part
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def measure(code: str, directory: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (bfloat16)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--naive", action="store_true", help="also measure load_file on every shard")
    args = parser.parse_args()
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="unmask-load-memory-") as tmp:
        directory = Path(tmp)
        n_layers = layers_for(args.gb)
        size = write_checkpoint(directory, n_layers, args.shards)
        print(f"checkpoint: LLaDA layout, {n_layers} layers, d_model {D_MODEL}, bfloat16, {args.shards} shards, "
              f"{size / mib:.0f} MiB of weights")
        r = measure(MEASURE, directory)
        grown = r["peak"] - r["before"]
        print(f"unmask.load: peak RSS {r['peak'] / mib:.0f} MiB; after imports {r['before'] / mib:.0f} MiB; "
              f"growth {grown / mib:.0f} MiB = {grown / size:.3f}x the checkpoint (model {r['model'] / mib:.0f} MiB, "
              f"{r['seconds']:.1f} s)")
        if args.naive:
            n = measure(NAIVE, directory)
            grown = n["peak"] - n["before"]
            print(f"naive load_file + load_state_dict: peak RSS {n['peak'] / mib:.0f} MiB; "
                  f"growth {grown / mib:.0f} MiB = {grown / size:.3f}x the checkpoint")


if __name__ == "__main__":
    main()
