"""Plot `unmask bench --json` reports: tokens/s against tokens per forward pass, diffusion vs AR.

    .venv/bin/python scripts/plot_bench.py runs/bench/embedded-cpu.json --out docs/img/bench-cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {  # kind/cache -> (label, marker)
    ("diffusion", "none"): ("diffusion, no cache", "o"),
    ("diffusion", "prefix"): ("diffusion, prefix cache", "s"),
    ("diffusion", "dual"): ("diffusion, dual cache", "D"),
    ("fast", "dual"): ("diffusion, fast path (dual cache)", "*"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, axes = plt.subplots(1, len(args.reports), figsize=(6.5 * len(args.reports), 4.5), squeeze=False)
    for ax, path in zip(axes[0], args.reports):
        report = json.loads(path.read_text())
        rows = [r for r in report["rows"] if "threshold" not in r["label"]]
        for (kind, cache), (label, marker) in STYLE.items():
            pts = sorted((r["tokens_per_forward"], r["tokens_per_s"]) for r in rows if r["kind"] == kind and r["cache"] == cache)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=label)
        for r in rows:
            if r["kind"] in ("ar", "fast-ar"):
                ax.scatter([1.0], [r["tokens_per_s"]], marker="X" if r["kind"] == "ar" else "P", s=90, zorder=3,
                           label="AR, KV cache" if r["kind"] == "ar" else "AR, static KV cache")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per forward pass")
        ax.set_ylabel("tokens/s (batch total)")
        ax.set_title(f"{report['model'].split('/')[-1]} · {report['device']}\nbatch {report['batch']}, "
                     f"prompt {report['prompt_len']}, gen {report['gen_len']}, block {report['block']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
