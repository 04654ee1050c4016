"""The CPU thread count: chosen in one place (``unmask.threads``), OMP_NUM_THREADS respected, reported by bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from unmask.threads import ThreadChoice, choose, measure


def test_omp_num_threads_wins() -> None:
    assert choose("3", physical=8, busy=6.0) == ThreadChoice(3, "OMP_NUM_THREADS=3")
    assert choose(" 1 ", physical=2, busy=0.0).threads == 1


def test_physical_cores_less_the_busy_ones_and_at_least_one() -> None:
    assert choose(None, physical=8, busy=0.3) == ThreadChoice(8, "8 physical cores")
    assert choose(None, physical=8, busy=2.6) == ThreadChoice(5, "8 physical cores, 3 busy with other work")
    assert choose(None, physical=2, busy=1.2).threads == 1  # the 2-core machine with a training run beside it
    assert choose(None, physical=2, busy=5.0) == ThreadChoice(1, "2 physical cores, 2 busy with other work")
    assert choose("", physical=4, busy=0.0).threads == 4  # set but empty: unset
    assert choose("zero", physical=4, busy=0.0).threads == 4  # not a count: unmask chooses


def test_a_cpu_quota_caps_the_cores() -> None:
    assert choose(None, physical=64, busy=0.0, quota=2.0) == ThreadChoice(2, "64 physical cores, a CPU quota of 2")
    assert choose(None, physical=64, busy=0.0, quota=1.5).threads == 2
    assert choose(None, physical=4, busy=0.0, quota=8.0).threads == 4


def test_the_measured_choice_stays_within_this_machines_cores() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = "from unmask.threads import measure; c = measure(); print(c.threads, c.reason, sep='|')"
    threads, reason = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                     check=True, timeout=60).stdout.strip().split("|")
    assert 1 <= int(threads) <= len(os.sched_getaffinity(0)) and "physical core" in reason
    assert measure().threads >= 1


def _bench(tmp_path: Path, env: dict) -> dict:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "unmask", "bench", "--shapes", "tiny", "--gen", "8", "--prompt-len", "8", "--block", "8",
           "--repeats", "1", "--device", "cpu", "--only", "ar", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert f"{report['threads']} thread" in proc.stderr and report["threads_reason"] in proc.stderr
    return report


def test_bench_says_how_many_threads_and_why(tmp_path: Path) -> None:
    pinned = _bench(tmp_path, {**os.environ, "OMP_NUM_THREADS": "1"})
    assert (pinned["threads"], pinned["threads_reason"]) == (1, "OMP_NUM_THREADS=1")
    free = _bench(tmp_path, {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert 1 <= free["threads"] <= len(os.sched_getaffinity(0)) and "physical core" in free["threads_reason"]
