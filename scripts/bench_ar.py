"""AR decoding of SmolLM2-135M on this CPU: unmask against llama.cpp and transformers, one run.

    .venv/bin/python scripts/bench_ar.py --threads 1,2 --rounds 3 --json runs/bench/ar-cpu.json

Batch 1, a 128-token prompt, 128 new tokens, greedy, end-of-text ignored. Peers:
- unmask's reference path (``unmask.decoding.ar.ar_generate``) and fast path (``FastARDecoder``),
  on the exact float32 dequantisation of the Q4_1 file (the default) and with the opt-in float16
  linear weights (``unmask.models.weights.half_linears``);
- llama.cpp's ``llama-bench`` (``-p 128 -n 128 -d 0,128``) on the Q4_1 file and on F16 and F32
  files written by ``unmask export`` (made here if missing);
- transformers' ``generate`` on its own loading of the same GGUF (float32), dynamic and static cache.
For unmask and transformers, decode ms/token is ``(time(128 new) - time(1 new)) / 127`` and prefill is
``time(1 new)``; llama.cpp's decode figure is its tg128 at depth 128 (the same context: 128 prompt
tokens, then 128 generated), tg128 at depth 0 is ``llama-bench -p 0 -n 128``.
Every peer runs once per round, the rounds interleave the peers (the order rotates each round) and
the thread counts, and the figures are medians over rounds, because the machine is shared.
The weight-read floor of a format is the bytes of weights one decode step reads (the tied head
reads the whole embedding) over the memory read bandwidth measured in each round (a large float32
sum at that thread count). ``--precision`` adds bfloat16 and int8 weight variants with their
logit differences from float32 and their greedy agreement over 64 tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import unmask
from unmask.decoding import GenerationConfig
from unmask.decoding.ar import ar_generate
from unmask.decoding.fast import FastARDecoder
from unmask.hub import packaged_path
from unmask.models.weights import half_linears

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TEXT = (  # natural code, longer than the prompt; its first --prompt-len tokens are the prompt
    "import math\nfrom typing import List, Optional\n\n\n"
    "def mean(values: List[float]) -> float:\n"
    '    """Arithmetic mean of a non-empty list."""\n'
    "    return sum(values) / len(values)\n\n\n"
    "def stdev(values: List[float]) -> float:\n"
    '    """Population standard deviation."""\n'
    "    m = mean(values)\n"
    "    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))\n\n\n"
    "def median(values: List[float]) -> Optional[float]:\n"
    '    """Median of the values, or None for an empty list.\n\n'
    "    >>> median([3.0, 1.0, 2.0])\n    2.0\n    >>> median([])\n    \n    \"\"\"\n"
    "    if not values:\n        return None\n"
    "    ordered = sorted(values)\n    middle = len(ordered) // 2\n"
    "    if len(ordered) % 2:\n        return ordered[middle]\n"
    "    return (ordered[middle - 1] + ordered[middle]) / 2\n\n\n"
    "def percentile(values: List[float], q: float) -> float:\n"
    '    """The q-th percentile (0 <= q <= 100) of the values, linearly interpolated.\n'
)


def cpu_info() -> dict[str, Any]:
    name, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", "x86_64"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16")
    return {"name": name, "cores": os.cpu_count(), "flags": [f for f in wanted if f in flags]}


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of ``repeats`` sums of a float32 tensor far larger than
    the caches (the best, because other processes on a shared machine only ever slow a run down)."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    return x.numel() * 4 / min(timed(x.sum) for _ in range(repeats)) / 1e9


def weight_bytes_unmask(model: nn.Module) -> int:
    """Bytes one decode step reads: every parameter and buffer except the embedding, whose one row is
    negligible, unless the head is tied to it (then the head reads it whole)."""
    seen, total = set(), 0
    embed = model.embed.weight
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() in seen or (t is embed and not model.config.tie_embeddings):
            continue
        if t is embed and not isinstance(model.head, nn.Linear):
            continue  # the head has its own (float16) copy
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def weight_bytes_gguf(path: Path) -> int:
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_timing(generate: Callable[[int], Any], n: int) -> dict[str, float]:
    """Prefill (1 new token) and decode ms/token from generating 1 and ``n`` tokens."""
    one, full = timed(lambda: generate(1)), timed(lambda: generate(n))
    decode_ms = (full - one) / (n - 1) * 1e3
    return {"prefill_ms": one * 1e3, "decode_ms_per_token": decode_ms, "decode_tokens_per_s": 1e3 / decode_ms,
            "end_to_end_tokens_per_s": n / full}


def greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False)


class Unmask:
    def __init__(self, model: nn.Module, path: str, prompt: list[int]) -> None:
        self.model, self.path, self.prompt = model, path, prompt
        self.fast = FastARDecoder(model) if path == "fast" else None

    def __call__(self, n: int) -> list[int]:
        if self.fast is not None:
            return self.fast.generate([self.prompt], greedy(n)).sequences[0]
        return ar_generate(self.model, [self.prompt], greedy(n)).sequences[0]


class Transformers:
    def __init__(self, gguf_path: Path, prompt: list[int], cache: str) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        ).eval()
        self.ids, self.cache = torch.tensor([prompt]), cache

    def __call__(self, n: int) -> list[int]:
        extra = {"cache_implementation": "static"} if self.cache == "static" else {}
        with torch.no_grad():
            out = self.model.generate(
                self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=self.model.config.eos_token_id, **extra,
            )
        return out[0, self.ids.shape[1] :].tolist()


def llama_bench(binary: Path, gguf_path: Path, threads: int, prompt_len: int, gen: int) -> dict[str, float]:
    cmd = [str(binary), "-m", str(gguf_path), "-p", str(prompt_len), "-n", str(gen), "-d", f"0,{prompt_len}",
           "-t", str(threads), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=900).stdout
    figures = {}
    for rec in json.loads(out):
        kind = "pp" if rec["n_gen"] == 0 else "tg"
        figures[f"{kind}{rec['n_prompt'] or rec['n_gen']}@d{rec['n_depth']}_tokens_per_s"] = float(rec["avg_ts"])
        figures["build"] = f"{rec.get('build_commit', '?')} ({rec.get('build_number', '?')})"
    tg = figures[f"tg{gen}@d{prompt_len}_tokens_per_s"]
    figures.update(decode_tokens_per_s=tg, decode_ms_per_token=1e3 / tg,
                   prefill_ms=prompt_len / figures[f"pp{prompt_len}@d0_tokens_per_s"] * 1e3)
    return figures


def ensure_exports(model_name: str, directory: Path) -> dict[str, Path]:
    """F16 and F32 GGUF files of the model, written by ``unmask export`` when missing."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for dtype in ("f16", "f32"):
        path = directory / f"{model_name}-{dtype}.gguf"
        if not path.is_file():
            subprocess.run([str(ROOT / ".venv/bin/unmask"), "export", model_name, "--gguf", str(path), "--dtype", dtype],
                           check=True)
        files[dtype.upper()] = path
    return files


class Int8Linear(nn.Module):
    """Weight-only int8 (per output channel, symmetric) through ``_weight_int8pack_mm``; activations bfloat16,
    the only fast input dtype of that kernel on x86."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("weight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale).reshape(*x.shape[:-1], -1).to(x.dtype)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))
    return model


def precision_variants(base: nn.Module) -> dict[str, Callable[[], nn.Module]]:
    def dynamic() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)

    return {
        "f32 (exact, default)": lambda: base,
        "f16 linear weights (opt-in)": lambda: half_linears(copy.deepcopy(base)),
        "bf16 model": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "int8 weight-only (_weight_int8pack_mm, bf16 act.)": lambda: replace_linears(copy.deepcopy(base), Int8Linear),
        "int8 dynamic (torch.ao quantize_dynamic)": dynamic,
    }


def precision(base: nn.Module, prompt: list[int], threads: int, n: int = 64) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref_logits = base(ids).float()
    ref_tokens = FastARDecoder(base).generate([prompt], greedy(n)).sequences[0]
    rows = []
    for label, make in precision_variants(base).items():
        model = make()
        with torch.no_grad():
            logits = model(ids).float()
        decoder = FastARDecoder(model)
        tokens = decoder.generate([prompt], greedy(n)).sequences[0]
        timing = [decode_timing(lambda k: decoder.generate([prompt], greedy(k)), n) for _ in range(2)]
        same = [a == b for a, b in zip(tokens, ref_tokens)]
        rows.append({
            "variant": label,
            "weight_bytes": weight_bytes_unmask(model) if label.startswith(("f32", "f16", "bf16")) else None,
            "decode_ms_per_token": min(t["decode_ms_per_token"] for t in timing),
            "prefill_ms": min(t["prefill_ms"] for t in timing),
            "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
            "greedy_equal_tokens": sum(same),
            "greedy_equal_prefix": same.index(False) if False in same else len(same),
            "greedy_tokens": n,
        })
        print(f"  {label:52s} {rows[-1]['decode_ms_per_token']:7.1f} ms/tok  prefill {rows[-1]['prefill_ms']:7.0f} ms  "
              f"max|dlogit| {rows[-1]['max_abs_logit_diff']:.4f}  greedy {sum(same)}/{n} "
              f"(equal prefix {rows[-1]['greedy_equal_prefix']})", flush=True)
        del model, decoder
    return rows


def profile(model: nn.Module, prompt: list[int], threads: int, steps: int = 32) -> dict[str, Any]:
    """Where a float32 decode step's time goes: the step, its linear layers alone (the same weights, one
    row), the head alone, the same 30-layer graph with tiny widths (per-op cost), and torch.profiler's top ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from unmask.models.config import ModelConfig
    from unmask.models.transformer import KVCache, Transformer

    torch.set_num_threads(threads)
    mc = model.config

    def step_ms(m: nn.Module) -> tuple[float, Callable[[], Any]]:
        ids = torch.tensor([prompt]) % m.config.vocab_size
        cache = KVCache.allocate(m.config, 1, ids.shape[1] + 2 * steps + 16, torch.float32, "cpu")
        with torch.no_grad():
            m(ids, cache=cache, logits_index=slice(-1, None))
        token = torch.tensor([[1]])

        def one() -> Any:
            with torch.no_grad():
                return m(token, cache=cache)

        one()
        times = [timed(one) for _ in range(steps)]
        return statistics.median(times) * 1e3, one

    full, one = step_ms(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    x = {n: torch.randn(1, 1, n) for n in {lin.in_features for lin in linears}}

    def all_linears() -> None:
        with torch.no_grad():
            for lin in linears:
                F.linear(x[lin.in_features], lin.weight)

    all_linears()
    matmul = statistics.median(timed(all_linears) for _ in range(9)) * 1e3
    head = statistics.median(timed(lambda: F.linear(x[mc.d_model], model.head.weight)) for _ in range(9)) * 1e3
    torch.manual_seed(0)
    tiny_cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=mc.n_layers, n_heads=mc.n_heads, n_kv_heads=mc.n_kv_heads,
                           head_dim=mc.head_dim, d_ff=128, max_seq_len=512, attention="causal", shifted=True, tie_embeddings=True)
    tiny, _ = step_ms(Transformer(tiny_cfg).eval())
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            one()
    top = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / 8, "calls_per_step": e.count / 8}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    report = {"threads": threads, "context": len(prompt), "step_ms": full, "linears_alone_ms": matmul, "head_alone_ms": head,
              "rest_ms": full - matmul, "tiny_widths_step_ms": tiny, "linear_calls_per_step": len(linears), "top_ops": top}
    print(f"  decode step {full:.1f} ms: its {len(linears)} linear layers alone {matmul:.1f} ms (head {head:.1f} ms), "
          f"the rest {full - matmul:.1f} ms; the same graph at tiny widths {tiny:.1f} ms")
    for row in top:
        print(f"    {row['op']:52s} {row['self_ms_per_step']:7.2f} ms/step  {row['calls_per_step']:6.0f} calls")
    return report


def median_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = statistics.median(values) if isinstance(values[0], (int, float)) else values[0]
    out["samples"] = samples
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a packaged GGUF name")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    parser.add_argument("--llama-cpp", type=Path, default=ROOT / ".cache/llama.cpp/bin")
    parser.add_argument("--gguf-dir", type=Path, default=ROOT / ".cache/bench", help="where the F16/F32 exports live")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--no-precision", action="store_true", help="skip the bf16/int8 weight variants")
    parser.add_argument("--profile", action="store_true", help="break a float32 decode step down")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    q4 = packaged_path(args.model)
    loaded = unmask.load(args.model, device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompt = tok.encode(PROMPT_TEXT)[: args.prompt_len]
    if len(prompt) < args.prompt_len:
        raise SystemExit(f"the prompt text has only {len(prompt)} tokens")
    half = half_linears(copy.deepcopy(model))
    peers: dict[str, Callable[[int], Any]] = {
        "unmask reference f32": Unmask(model, "reference", prompt),
        "unmask fast f32": Unmask(model, "fast", prompt),
        "unmask fast f16 weights": Unmask(half, "fast", prompt),
    }
    bytes_per_token = {"unmask f32": weight_bytes_unmask(model), "unmask f16 weights": weight_bytes_unmask(half)}
    if not args.no_transformers:
        for cache in ("dynamic", "static"):
            peers[f"transformers {cache} cache f32"] = Transformers(q4, prompt, cache)
    llama_files: dict[str, Path] = {}
    llama_bin = args.llama_cpp / "llama-bench"
    if not args.no_llama_cpp:
        if not llama_bin.is_file():
            raise SystemExit(f"{llama_bin} not found: run scripts/build_llama_cpp.sh (or pass --no-llama-cpp)")
        llama_files = {"Q4_1": q4, **ensure_exports(args.model, args.gguf_dir)}
        for fmt, path in llama_files.items():
            bytes_per_token[f"llama.cpp {fmt}"] = weight_bytes_gguf(path)

    samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
    bandwidth: dict[int, list[float]] = {t: [] for t in threads}
    loads = [os.getloadavg()]
    names = [*peers, *(f"llama.cpp {fmt}" for fmt in llama_files)]
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for t in threads:
            bandwidth[t].append(read_bandwidth(t))
            for name in order:
                torch.set_num_threads(t)
                if name in peers:
                    fig = decode_timing(peers[name], args.gen)
                else:
                    fig = llama_bench(llama_bin, llama_files[name.split()[-1]], t, args.prompt_len, args.gen)
                samples.setdefault((name, t), []).append(fig)
                print(f"round {r + 1} threads {t} {name:32s} {fig['decode_tokens_per_s']:6.1f} tok/s "
                      f"{fig['decode_ms_per_token']:6.1f} ms/tok  prefill {fig['prefill_ms']:6.0f} ms", flush=True)
            loads.append(os.getloadavg())

    results = {f"{name} | {t}": median_figures(s) for (name, t), s in samples.items()}
    floors = {}
    for t in threads:
        bw = statistics.median(bandwidth[t])
        for fmt, nbytes in bytes_per_token.items():
            floors[f"{fmt} | {t}"] = {"bytes": nbytes, "read_GBps": bw, "floor_ms": nbytes / bw / 1e6}

    def tps(name: str, t: int) -> float | None:
        row = results.get(f"{name} | {t}")
        return row["decode_tokens_per_s"] if row else None

    ratios = {}
    pairs = [("unmask fast f32", "llama.cpp F32"), ("unmask fast f16 weights", "llama.cpp F16"),
             ("unmask fast f32", "llama.cpp Q4_1"), ("unmask fast f16 weights", "llama.cpp Q4_1"),
             ("unmask reference f32", "llama.cpp F32"), ("unmask fast f32", "transformers dynamic cache f32"),
             ("unmask fast f32", "transformers static cache f32"), ("unmask reference f32", "transformers dynamic cache f32"),
             ("unmask fast f16 weights", "transformers static cache f32")]
    for t in threads:
        for a, b in pairs:
            if tps(a, t) and tps(b, t):
                ratios[f"{a} / {b} | {t}"] = tps(a, t) / tps(b, t)

    print(f"\nCPU {cpu_info()['name']} ({cpu_info()['cores']} cores; {' '.join(cpu_info()['flags'])}), torch {torch.__version__}")
    print(f"load average (1, 5, 15 min) before {loads[0]}, after {loads[-1]}")
    print(f"\n{'peer':34s} {'thr':>3s} {'tok/s':>7s} {'ms/tok':>7s} {'floor ms':>8s} {'x floor':>7s} {'prefill ms':>10s}")
    for (name, t) in samples:
        row = results[f"{name} | {t}"]
        fmt = ("unmask f16 weights" if "f16" in name else "unmask f32") if name.startswith(("unmask", "transformers")) else name
        floor = floors.get(f"{fmt} | {t}", {}).get("floor_ms")
        print(f"{name:34s} {t:3d} {row['decode_tokens_per_s']:7.1f} {row['decode_ms_per_token']:7.1f} "
              f"{floor or float('nan'):8.1f} {row['decode_ms_per_token'] / floor if floor else float('nan'):7.2f} {row['prefill_ms']:10.0f}")
    print("\nweight-read floor per decode step:")
    for key, f in floors.items():
        print(f"  {key:28s} {f['bytes'] / 1e6:7.1f} MB / {f['read_GBps']:5.1f} GB/s = {f['floor_ms']:6.1f} ms")
    print("\nratios of decode tokens/s:")
    for key, value in ratios.items():
        print(f"  {key:70s} {value:5.2f}")

    report: dict[str, Any] = {
        "command": "scripts/bench_ar.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v not in (None, False) and k not in ("llama_cpp", "gguf_dir")),
        "cpu": cpu_info(), "torch": torch.__version__, "python": platform.python_version(),
        "llama_cpp": (args.llama_cpp.parent / "VERSION").read_text().strip() if (args.llama_cpp.parent / "VERSION").is_file() else None,
        "llama_cpp_build": next((r["build"] for r in results.values() if "build" in r), None),
        "transformers": __import__("transformers").__version__ if not args.no_transformers else None,
        "model": args.model, "prompt_len": args.prompt_len, "gen": args.gen, "batch": 1, "threads": threads,
        "rounds": args.rounds, "load_average": loads, "results": results, "floors": floors, "ratios": ratios,
        "bandwidth_GBps": bandwidth,
    }
    if not args.no_precision:
        print(f"\nweight formats ({threads[0]} thread(s); differences from the exact float32 path):")
        report["precision"] = precision(model, prompt, threads[0])
    if args.profile:
        print(f"\nprofile of the float32 decode step ({threads[0]} thread(s)):")
        report["profile"] = profile(model, prompt, threads[0])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
