"""The speed/quality frontier: eval metrics against tokens/s for several decoding settings, AR beside them.

    .venv/bin/python scripts/frontier.py --model DIR --ar-model DIR --out runs/frontier \\
        --metrics syntax,humaneval,infill --settings steps=1,steps=2,steps=4,threshold=0.9,threshold=0.7

Each setting runs `unmask eval METRIC --json` in its own process (the decoding flags of the
setting added), so every figure has the exact command beside it in the output; `--jobs N` runs N
of them at once with `--threads` threads each. ``steps=K`` means
K tokens per step (`--steps max_new_tokens/K`, and for infilling `--tokens-per-step K`, since
holes differ in length); ``threshold=T`` the threshold policy. Writes
`frontier.json`, `frontier.md` (the table, with the commands) and `frontier.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def metric_value(metric: str, record: dict) -> dict[str, float]:
    """The figures of one eval record that go on the frontier."""
    if metric == "syntax":
        return {"syntax rate": record["valid_rate"]}
    if metric == "humaneval":
        return {"HumanEval pass@1": record["pass_at_1"]}
    return {f"infill {kind} pass": part["pass_rate"] for kind, part in record["summary"].items()}


def setting_flags(setting: str, max_new_tokens: int, metric: str) -> list[str]:
    key, _, value = setting.partition("=")
    if key == "steps" and metric == "infill":  # holes differ in length: the same pace for each
        return ["--tokens-per-step", value]
    if key == "steps":
        return ["--steps", str(max(max_new_tokens // int(value), 1))]
    if key == "threshold":
        return ["--policy", "threshold", "--threshold", value]
    raise SystemExit(f"unknown setting {setting!r} (use steps=K or threshold=T)")


def parse_limits(text: str, metrics: list[str]) -> dict[str, int]:
    """``"200"`` (every metric) or ``"syntax=200,infill=50"`` as {metric: limit}."""
    if not text:
        return {}
    if "=" not in text:
        return {m: int(text) for m in metrics}
    return {k: int(v) for k, _, v in (part.partition("=") for part in text.split(","))}


def run(cmd: list[str], out: Path, threads: int, reuse: bool) -> dict:
    if reuse and out.is_file():
        print("reusing", out, file=sys.stderr, flush=True)
        return json.loads(out.read_text())
    print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusion model (default: the embedded one)")
    p.add_argument("--ar-model", help="its AR twin, evaluated once as a point on the same axes")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--metrics", default="syntax,humaneval,infill")
    p.add_argument("--settings", default="steps=1,steps=2,steps=4,steps=8,threshold=0.9,threshold=0.7")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--limit", default="", help="items per metric: N for every metric, or METRIC=N,... (quick runs)")
    p.add_argument("--reuse", action="store_true", help="keep results already in --out instead of running them again")
    p.add_argument("--cache", default="none", choices=("none", "prefix", "dual"))
    p.add_argument("--data", help="held-out data for the syntax headers of every model (a shard directory); without it a "
                                  "model reads its own validation split, so a twin with no training record gets other headers")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="evaluations run at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in args.metrics.split(",") if m]
    runs = [(s, "diffusion", args.model, ["--cache", args.cache]) for s in args.settings.split(",") if s]
    if args.ar_model:
        runs.append(("AR", "ar", args.ar_model, []))
    limits = parse_limits(args.limit, metrics)
    commands = {}
    for label, kind, model, flags in runs:
        for metric in metrics:
            out = args.out / f"{metric}-{label.replace('=', '')}.json"
            cmd = [sys.executable, "-m", "unmask", "eval", metric, "--device", args.device, "--json", str(out)]
            cmd += ["--model", model] if model else []
            cmd += ["--limit", str(limits[metric])] if metric in limits else []
            cmd += [] if metric == "infill" else ["--max-new-tokens", str(args.max_new_tokens)]
            cmd += ["--data", args.data] if metric == "syntax" and args.data else []
            cmd += setting_flags(label, args.max_new_tokens, metric) + flags if kind == "diffusion" else []
            commands[label, metric] = (cmd, out)
    with ThreadPoolExecutor(args.jobs) as pool:
        records = dict(zip(commands, pool.map(lambda c: run(*c, args.threads, args.reuse), commands.values())))
    rows, metric_of = [], {}
    for label, kind, _, _ in runs:
        row = {"setting": label, "kind": kind, "commands": [], "figures": {}, "tokens_per_s": {}, "tokens_per_forward": {}}
        for metric in metrics:
            record = records[label, metric]
            row["commands"].append(shlex.join(commands[label, metric][0]))
            figures = metric_value(metric, record)
            row["figures"].update(figures)
            metric_of.update({name: metric for name in figures})
            row["tokens_per_s"][metric] = record["decoding"]["tokens_per_second"]
            row["tokens_per_forward"][metric] = record["decoding"]["tokens_per_forward"]
        rows.append(row)
    (args.out / "frontier.json").write_text(json.dumps(rows, indent=2) + "\n")
    names = sorted({k for r in rows for k in r["figures"]})
    lines = ["| setting | " + " | ".join(names) + " | tokens/s at tokens/forward, per metric |", "|---" * (len(names) + 2) + "|"]
    for r in rows:
        speeds = ", ".join(f"{m} {v} at {r['tokens_per_forward'][m]}" for m, v in r["tokens_per_s"].items())
        lines.append(f"| {r['setting']} | " + " | ".join(f"{r['figures'].get(n, float('nan')):.1%}" for n in names) + f" | {speeds} |")
    lines += ["", "Commands:", "", "```bash", *[c for r in rows for c in r["commands"]], "```"]
    (args.out / "frontier.md").write_text("\n".join(lines) + "\n")
    cols = min(len(names), 2)
    rows_n = -(-len(names) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4 * rows_n), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        metric = metric_of[name]
        top = 0.0
        for kind, marker in (("diffusion", "o"), ("ar", "X")):
            pts = [(r["tokens_per_s"][metric], r["figures"][name], r["setting"]) for r in rows if r["kind"] == kind]
            if pts:
                ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker, s=60, label=kind)
                for i, (x, y, text) in enumerate(pts):  # labels staggered so neighbours stay readable
                    ax.annotate(text, (x, y), fontsize=7, xytext=(4, 4 + 9 * (i % 3)), textcoords="offset points")
                top = max([top] + [y for _, y, _ in pts])
        ax.set_ylim(0, max(0.05, top * 1.25))
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xscale("log")
        ax.set_xlabel("tokens/s")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "frontier.png", dpi=120)
    print(args.out / "frontier.md")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
