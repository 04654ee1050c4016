"""`unmask bench`: runs end to end and reports figures that agree with each other."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from unmask import bench


def test_bench_cli_reports_consistent_figures(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "unmask", "bench", "--shapes", "tiny", "--gen", "16", "--prompt-len", "8",
           "--block", "8", "--repeats", "1", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["gen_len"] == 16 and report["batch"] == 1 and report["floor_ms"] > 0
    assert "AR, KV cache" in proc.stdout and "x floor" in proc.stdout
    for row in report["rows"]:
        assert row["tokens"] == 16  # stop_at_eos is off: every setting writes the whole canvas
        assert row["tokens_per_forward"] == pytest.approx(16 / row["nfe"])
        assert row["tokens_per_s"] == pytest.approx(16 / sorted(row["seconds"])[0], rel=1e-6)
        assert row["floor_multiple"] == pytest.approx(row["ms_per_forward"] / report["floor_ms"])
    by_label = {row["label"]: row for row in report["rows"]}
    assert by_label["confidence 8/step +dual cache"]["nfe"] == 2
    assert by_label["AR, KV cache"]["nfe"] == 16


def test_ar_twin_shares_weights_and_reads_causally():
    model = bench.random_model("tiny", torch.device("cpu"), torch.float32, 32)
    twin = bench.as_autoregressive(model)
    assert twin.config.attention == "causal" and model.config.attention == "bidirectional"
    assert twin.embed.weight is model.embed.weight
    ids = torch.randint(2, 500, (1, 10))
    with torch.no_grad():
        full = twin(ids)
        prefix = twin(ids[:, :6])
    torch.testing.assert_close(full[:, :6], prefix)  # causal: later tokens never change earlier logits
    assert bench.weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters())


def test_bad_bench_arguments_fail_cleanly():
    proc = subprocess.run([sys.executable, "-m", "unmask", "bench", "--shapes", "gpt-9"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 1 and "unknown shapes" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "unmask", "bench", "--model", "coder-nano-cpu", "--prompt-len", "300", "--gen", "300"],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 1 and "context" in proc.stderr


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_cache_agreement_is_total_when_caches_refresh_every_step():
    model = bench.random_model("tiny", torch.device("cpu"), torch.float32, 64)
    prompts = [[5 + i, 9, 11 + i] for i in range(3)]
    rows = bench.cache_agreement(model, prompts, gen=16, block=8, tpfs=(1, 4), refresh=1)
    assert [(r["tokens_per_step"], r["cache"]) for r in rows] == [(1, "prefix"), (1, "dual"), (4, "prefix"), (4, "dual")]
    assert all(r["token_agreement"] == 1.0 and r["exact"] == 1.0 for r in rows)
