"""Speed benchmark: diffusion decoding settings against AR decoding, same model size, same run.

Reports, per setting: forward passes (NFE), tokens per forward (TPF), ms per forward pass,
tokens/s, and the step time as a multiple of the weight-read floor: at batch 1 a forward pass
cannot beat reading every weight once from memory, ``weight bytes / bandwidth``, with the
bandwidth measured on the same device in the same run.
"""

from __future__ import annotations

import copy
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unmask.decoding import GenerationConfig, decode
from unmask.decoding.fast import FastARDecoder, FastDecoder
from unmask.decoding.settings import SETTING
from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode, ModelConfig
from unmask.models.transformer import Transformer
from unmask.threads import current as current_threads
from unmask.tokenizer import Tokenizer

# Published model shapes, built with random weights on the device (no download needed).
SHAPES: dict[str, dict[str, Any]] = {
    "llada-8b": dict(vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=12288, rope_theta=500000.0),
    "dream-7b": dict(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944, qkv_bias=True),
    "coder-nano": dict(vocab_size=12288, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408, tie_embeddings=True),
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=176),
}
TOKENS_PER_STEP = (1, 2, 4, 8)  # fixed tokens-per-step settings timed by default
THRESHOLDS = (0.9, 0.7)  # threshold-policy settings timed by default
CACHES = SETTING["cache"].choices


@dataclass
class Setting:
    """One decoding setting to time."""

    label: str  # shown in the table
    kind: str  # diffusion | ar (reference loops) | fast | fast-ar (static shapes, CUDA graphs on a GPU)
    config: GenerationConfig


@dataclass
class Row:
    label: str
    kind: str
    policy: str
    steps: int | None
    cache: str
    nfe: float  # forward passes per sequence (median over repeats)
    tokens: float  # generated tokens per sequence
    tokens_per_forward: float
    ms_per_forward: float
    tokens_per_s: float  # over the whole batch
    floor_multiple: float  # ms per forward / weight-read floor (1.0 = at the limit)
    seconds: list[float] = field(default_factory=list)  # wall time of each timed repeat


def synthetic_prompts(vocab_size: int, batch: int, length: int) -> list[list[int]]:
    """Distinct fixed prompts for random weights (any ids do; ids 0 and 1 are EOS and pad)."""
    return [[2 + (7919 * (r + 1) * (i + 1)) % (vocab_size - 4) for i in range(length)] for r in range(batch)]


def source_prompts(tokenizer: Tokenizer, batch: int, length: int) -> list[list[int]]:
    """``batch`` rotations of the first ``length`` tokens of this file: real text, the same every run."""
    ids = tokenizer.encode(Path(__file__).read_text())[:length]
    return [ids[r:] + ids[:r] for r in range(batch)]


def heldout_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts cut at even strides from unmask's own sources, which no model trained on."""
    sources = sorted(Path(__file__).parent.rglob("*.py"))
    ids = [t for path in sources for t in tokenizer.encode(path.read_text())]
    stride = max((len(ids) - length) // count, 1)
    return [ids[i * stride : i * stride + length] for i in range(count)]


def random_model(shape: str, device: torch.device, dtype: torch.dtype, max_len: int) -> Transformer:
    """A model of a published shape with random weights, built directly on ``device``."""
    if shape not in SHAPES:
        raise UnmaskError(f"unknown shapes {shape!r} (choose from {', '.join(SHAPES)})")
    vocab = SHAPES[shape]["vocab_size"]
    config = ModelConfig(
        **SHAPES[shape], max_seq_len=max(max_len, 64), attention=AttentionMode.BIDIRECTIONAL,
        mask_token_id=vocab - 1, eos_token_id=0, pad_token_id=1, init_std=0.02,
    )
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives every parameter its own storage
        model.head.weight = model.embed.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.to(dtype).eval()


def as_autoregressive(model: Transformer) -> Transformer:
    """The same weights read as a causal, shifted (AR) model: a shallow copy with another config."""
    twin = copy.copy(model)
    twin.config = replace(model.config, attention=AttentionMode.CAUSAL, shifted=True)
    return twin


def measure_bandwidth(device: torch.device, megabytes: int = 1024) -> float:
    """Device memory bandwidth in bytes/s from large copies (each reads and writes every byte)."""
    n = megabytes * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        began = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - began)
    return 2 * src.numel() * src.element_size() / min(times[1:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: nn.Module) -> int:
    """Bytes a forward pass must read: every distinct parameter once (tied weights once)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def default_settings(gen: int, block: int, tpfs: tuple[int, ...] = TOKENS_PER_STEP,
                     thresholds: tuple[float, ...] = THRESHOLDS) -> list[Setting]:
    """Diffusion at fixed tokens-per-step with and without block caches, thresholds, the fast paths, then AR.

    Fixed tokens-per-step settings time a forward pass independently of what the model predicts,
    which is what random weights allow; thresholds commit what the model is sure of, which only
    means something for a trained model.
    """
    out = []
    base = dict(max_new_tokens=gen, block_size=block, stop_at_eos=False)
    for tpf in tpfs:
        steps = max(gen // tpf, 1)
        for cache in CACHES:
            if tpf == 1 and cache != "none":
                continue
            label = f"confidence {tpf}/step" + ("" if cache == "none" else f" +{cache} cache")
            out.append(Setting(label, "diffusion", GenerationConfig(**base, steps=steps, policy="confidence", cache=cache)))
    for tau in thresholds:
        out.append(Setting(f"threshold {tau} +dual cache", "diffusion", GenerationConfig(**base, policy="threshold", threshold=tau, cache="dual")))
    for tpf in tpfs:
        config = GenerationConfig(**base, steps=max(gen // tpf, 1), policy="confidence", cache="dual")
        out.append(Setting(f"fast: confidence {tpf}/step +dual cache", "fast", config))
    for tau in thresholds:
        config = GenerationConfig(**base, policy="threshold", threshold=tau, cache="dual")
        out.append(Setting(f"fast: threshold {tau} +dual cache", "fast", config))
    out.append(Setting("AR, KV cache", "ar", GenerationConfig(max_new_tokens=gen, stop_at_eos=False)))
    out.append(Setting("fast: AR, static KV cache", "fast-ar", GenerationConfig(max_new_tokens=gen, stop_at_eos=False)))
    return out


def time_setting(
    model: Transformer, prompts: list[list[int]], setting: Setting, repeats: int, floor_ms: float, device: torch.device
) -> Row:
    """Median over ``repeats`` timed runs after one warm-up run (which also compiles, on a GPU)."""
    run = lambda: decode(model, prompts, setting.config, seeds=seeds)  # noqa: E731
    seeds = list(range(len(prompts)))
    if setting.kind in ("fast", "fast-ar"):
        kind = FastDecoder if setting.kind == "fast" else FastARDecoder
        decoder = kind(model, compile=device.type == "cuda")
        run = lambda: decoder.generate(prompts, setting.config, seeds=seeds)  # noqa: E731
    runs = []
    for i in range(repeats + 1):
        sync(device)
        began = time.perf_counter()
        result = run()
        sync(device)
        if i:
            runs.append((time.perf_counter() - began, result))
    seconds = [s for s, _ in runs]
    wall, result = sorted(runs, key=lambda x: x[0])[len(runs) // 2]
    tokens = sum(len(s) for s in result.sequences)
    ms = 1000 * wall / max(result.nfe, 1)
    return Row(
        label=setting.label,
        kind=setting.kind,
        policy="ar" if setting.kind.endswith("ar") else setting.config.policy,
        steps=setting.config.steps,
        cache="kv" if setting.kind.endswith("ar") else setting.config.cache,
        nfe=result.nfe,
        tokens=tokens / len(prompts),
        tokens_per_forward=result.tokens_per_forward,
        ms_per_forward=ms,
        tokens_per_s=tokens / wall,
        floor_multiple=ms / floor_ms,
        seconds=seconds,
    )


def run_bench(
    diffusion: Transformer,
    ar: Transformer | None,
    prompts: list[list[int]],
    settings: list[Setting],
    *,
    repeats: int = 3,
    model_name: str = "",
    on_row: Any = None,
) -> dict[str, Any]:
    """Time every setting; returns the report (environment, shapes, floor, rows)."""
    device = next(diffusion.parameters()).device
    bandwidth = measure_bandwidth(device, 1024 if device.type == "cuda" else 256)
    wbytes = weight_bytes(diffusion)
    floor_ms = 1000 * wbytes / bandwidth
    rows = []
    with torch.inference_mode():
        for setting in settings:
            is_ar = setting.kind.endswith("ar")
            if is_ar and ar is None:
                continue
            model = ar if is_ar else diffusion
            row = time_setting(model, prompts, setting, repeats, floor_ms, device)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    mc = diffusion.config
    threads = current_threads()
    return {
        "model": model_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {threads.describe()})",
        "threads": threads.threads,  # torch's intra-op threads during the timings
        "threads_reason": threads.reason,  # OMP_NUM_THREADS, unmask's choice (unmask.threads) or the program's
        "torch": torch.__version__,
        "dtype": str(next(diffusion.parameters()).dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in diffusion.parameters()),
        "shape": {k: getattr(mc, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")},
        "batch": len(prompts),
        "prompt_len": len(prompts[0]),
        "gen_len": settings[0].config.max_new_tokens if settings else 0,
        "block": settings[0].config.block_size if settings else None,
        "bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": wbytes,
        "floor_ms": floor_ms,
        "rows": [asdict(r) for r in rows],
    }


def cache_agreement(
    model: Transformer, prompts: list[list[int]], gen: int, block: int, tpfs: tuple[int, ...], refresh: int | None = None
) -> list[dict[str, Any]]:
    """How often the approximate block caches change the output: greedy decoding with each cache
    against the same decoding without one, per tokens-per-step setting.

    ``token_agreement`` is the share of generated positions with the same token, ``exact`` the
    share of prompts whose whole output is unchanged.
    """
    rows = []
    with torch.inference_mode():
        for tpf in tpfs:
            base = dict(max_new_tokens=gen, block_size=block, steps=max(gen // tpf, 1), stop_at_eos=False)
            plain = decode(model, prompts, GenerationConfig(**base)).sequences
            for cache in (c for c in CACHES if c != "none"):
                out = decode(model, prompts, GenerationConfig(**base, cache=cache, cache_refresh=refresh)).sequences
                same = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(plain, out))
                total = sum(max(len(x), len(y)) for x, y in zip(plain, out))
                rows.append({
                    "tokens_per_step": tpf, "cache": cache, "refresh": refresh,
                    "token_agreement": same / max(total, 1),
                    "exact": sum(x == y for x, y in zip(plain, out)) / len(prompts),
                })
    return rows
