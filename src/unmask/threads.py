"""How many threads torch's CPU kernels use: chosen once, on purpose, and reported.

torch starts one OpenMP thread per CPU, and its threads spin at every barrier: when another
process keeps a core busy, the thread sharing that core is preempted and the others wait for
it. On a 2-core machine with a training run beside it, one forward pass of the embedded model
took a median of 0.37-1.1 s with torch's 2 threads and 0.04-0.075 s with 1
(``scripts/forward_threads.py``). So the count is chosen here, in order:

1. ``OMP_NUM_THREADS`` when it is set (torch reads it at start-up; it is left as it is);
2. otherwise the physical cores this process may use (hyperthread siblings count once, a
   cgroup CPU quota caps them), less the cores other processes keep busy right now (measured
   over ``SAMPLE_S`` from ``/proc/stat``), and at least one.

The command line chooses for every command that runs a model (``unmask.cli``); the library never
changes torch's setting by itself: a program that imports unmask calls ``configure()``, or sets
``torch.set_num_threads`` itself, which unmask then leaves alone.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_S = 0.1  # how long the other processes' CPU use is measured before choosing
ENV = "OMP_NUM_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count and why."""

    threads: int
    reason: str  # e.g. "OMP_NUM_THREADS=1" or "2 physical cores, 1 busy"

    def describe(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''} ({self.reason})"


_chosen: ThreadChoice | None = None


def choose(env_value: str | None, physical: int, busy: float, quota: float | None = None) -> ThreadChoice:
    """The choice from the facts: ``OMP_NUM_THREADS`` (None: unset), the usable physical cores, the
    cores others keep busy (in CPUs, may be fractional) and a CPU quota (None: none)."""
    if env_value is not None and env_value.strip():
        try:
            count = int(env_value)
        except ValueError:
            count = 0
        if count >= 1:
            return ThreadChoice(count, f"{ENV}={count}")
    cores = max(1, physical)
    parts = [f"{cores} physical core{'s' if cores != 1 else ''}"]
    if quota is not None and math.ceil(quota) < cores:
        cores = max(1, math.ceil(quota))
        parts.append(f"a CPU quota of {quota:g}")
    taken = int(busy + 0.5)
    if taken:
        parts.append(f"{min(taken, cores)} busy with other work")
    return ThreadChoice(max(1, cores - taken), ", ".join(parts))


def measure() -> ThreadChoice:
    """The choice for this process on this machine now (takes ``SAMPLE_S`` unless ``OMP_NUM_THREADS`` is set)."""
    value = os.environ.get(ENV)
    if value is not None and value.strip():
        return choose(value, 1, 0.0)
    cpus = _usable_cpus()
    return choose(None, _physical_cores(cpus), _busy_cpus(cpus, SAMPLE_S), _cpu_quota())


def configure() -> ThreadChoice:
    """Choose (``measure``) and apply the count to torch; later calls return the first choice."""
    global _chosen
    if _chosen is None:
        choice = measure()
        import torch

        if not choice.reason.startswith(ENV):  # torch has read OMP_NUM_THREADS itself
            torch.set_num_threads(choice.threads)
        _chosen = ThreadChoice(torch.get_num_threads(), choice.reason)
    return _chosen


def current() -> ThreadChoice:
    """What torch uses now: unmask's choice when ``configure`` ran and nothing changed it since."""
    import torch

    n = torch.get_num_threads()
    if _chosen is not None and _chosen.threads == n:
        return _chosen
    if os.environ.get(ENV, "").strip():
        return ThreadChoice(n, f"{ENV}={os.environ[ENV].strip()}")
    return ThreadChoice(n, "set by the program" if _chosen is not None else "torch's default")


# ---------------------------------------------------------------------------- facts about the machine


def _usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int:
    """Distinct (package, core) pairs among ``cpus``; the CPU count where the topology is not readable."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def _cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` quota (containers started with ``--cpus``), None if none."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """Per CPU: (busy, total) jiffies from ``/proc/stat``; busy excludes idle and I/O wait."""
    wanted, out = set(cpus), {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in wanted):
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def _busy_cpus(cpus: list[int], seconds: float) -> float:
    """CPUs' worth of work other processes did on ``cpus`` over ``seconds`` (this one sleeps meanwhile)."""
    before = _cpu_times(cpus)
    if not before:
        return 0.0
    time.sleep(seconds)
    after = _cpu_times(cpus)
    busy = 0.0
    for cpu, (b0, t0) in before.items():
        b1, t1 = after.get(cpu, (b0, t0))
        if t1 > t0:
            busy += (b1 - b0) / (t1 - t0)
    return busy
