"""Running model-written Python programs in a separate, limited process.

Each program runs in its own ``python -I`` process (isolated mode: no ``PYTHON*`` variables, no
user site, no script directory on ``sys.path``), never in the evaluator's process, with

- a wall-clock timeout, after which its whole process group is killed;
- resource limits set before the program's first line: address space (``RLIMIT_AS``), CPU
  seconds (``RLIMIT_CPU``), the size of any file it writes, its own output included
  (``RLIMIT_FSIZE``), no new processes or threads (``RLIMIT_NPROC`` = 0; not enforced for root),
  no core dumps;
- a fresh temporary working directory (also ``HOME`` and ``TMPDIR``), deleted afterwards;
- a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only);
- no network where the OS allows: a new, empty network namespace (``unshare -n``, or
  ``unshare -rn`` through a user namespace when not root); when the evaluator runs as root and
  the unprivileged user ``nobody`` can run the interpreter, the program runs as ``nobody``.
  ``isolation()`` says which of these this machine allows.

A program passes only if it runs to its end: exit status 0 *and* a one-time token, printed by
the launcher after the program's last statement, on stdout. ``sys.exit(0)`` halfway through
does not pass.

This is NOT a security boundary. It keeps honest mistakes (infinite loops, huge allocations,
stray files, runaway output) from hurting the evaluator; a program written to escape can: it runs
as the evaluator's user unless the privilege drop above applies (then it can still read
whatever ``nobody`` can read and use the file system's world-writable places), and nothing
limits disk use beyond the per-file cap. Run untrusted code inside a container or VM.
"""

from __future__ import annotations

import functools
import math
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

# Runs inside the child: limits first, then the program from stdin, then the completion token.
_LAUNCHER = r"""
import resource, sys
limits = [int(v) for v in sys.argv[1:]]
names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_CORE")
for name, value in zip(names, limits):
    if value >= 0 and hasattr(resource, name):
        try:
            hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL a second later
            resource.setrlimit(getattr(resource, name), (value, hard))
        except (ValueError, OSError):
            pass
token = sys.stdin.readline().strip()
source = sys.stdin.read()
sys.stdin.close()
sys.argv = ["program.py"]
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(source, "program.py", "exec"), namespace)
sys.stdout.flush()
sys.stdout.write("\n" + token + "\n")
sys.stdout.flush()
"""

OUTPUT_TAIL = 4000  # characters of stdout/stderr kept in a result


@dataclass
class Limits:
    """What one program may use."""

    timeout: float = 5.0  # wall-clock seconds before the process group is killed
    memory_mb: int = 1024  # address space (RLIMIT_AS), interpreter included
    cpu_seconds: int | None = None  # RLIMIT_CPU; None = the timeout rounded up, plus one
    file_mb: int = 16  # largest file the program may write, its captured stdout/stderr included
    processes: int = 0  # RLIMIT_NPROC: new processes/threads allowed (ignored for root)


@dataclass
class Isolation:
    """How programs are separated from the machine here (found once by probing)."""

    prefix: list[str] = field(default_factory=list)  # command run before the interpreter (unshare ...)
    user: int | None = None  # uid to run as (root only: nobody), None = the evaluator's user
    group: int | None = None  # gid to go with ``user``
    network: bool = False  # True: the program gets an empty network namespace

    def describe(self) -> dict[str, str]:
        return {
            "process": "separate python -I process per program, own process group",
            "network": "isolated (empty network namespace)" if self.network else "NOT isolated (no network namespace allowed here)",
            "user": "nobody" if self.user is not None else f"the evaluator's user ({pwd.getpwuid(os.geteuid()).pw_name})",
        }


@dataclass
class RunResult:
    """The outcome of one program."""

    outcome: str  # "passed" (ran to its end, status 0) | "failed" | "timeout"
    returncode: int | None  # exit status; negative = killed by that signal
    reason: str  # one line: the exception or why it was killed ("" when passed)
    stdout: str  # last OUTPUT_TAIL characters of stdout (launcher token removed)
    stderr: str  # last OUTPUT_TAIL characters of stderr
    elapsed: float  # wall-clock seconds

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


def _probe(command: list[str], **kwargs) -> bool:
    try:
        proc = subprocess.run(command, capture_output=True, timeout=20, env=_environment(tempfile.gettempdir()), **kwargs)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


@functools.lru_cache(maxsize=None)
def isolation(python: str = sys.executable) -> Isolation:
    """The most isolated way to run ``python`` that works on this machine."""
    check = [python, "-I", "-c", "pass"]
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    nobody = None
    if root:
        try:
            entry = pwd.getpwnam("nobody")
            nobody = (entry.pw_uid, entry.pw_gid)
        except KeyError:
            nobody = None
    options: list[Isolation] = []
    if unshare and root and nobody:
        uid, gid = nobody
        options.append(Isolation([unshare, "-n", "--setgid", str(gid), "--setuid", str(uid), "--"], uid, gid, True))
    if unshare:
        options.append(Isolation([unshare, "-n", "--"], None, None, True))
        if not root:
            options.append(Isolation([unshare, "-rn", "--"], None, None, True))
    if root and nobody:
        options.append(Isolation([], nobody[0], nobody[1], False))
    for option in options:
        kwargs = {} if option.prefix or option.user is None else {"user": option.user, "group": option.group, "extra_groups": []}
        if _probe(option.prefix + check, **kwargs):
            return option
    return Isolation()


def _environment(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4 * OUTPUT_TAIL))
        return f.read().decode("utf-8", "replace")[-OUTPUT_TAIL:]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(source: str, limits: Limits | None = None, python: str = sys.executable) -> RunResult:
    """Run ``source`` as a program in a fresh sandbox process and report how it ended."""
    limits = limits or Limits()
    iso = isolation(python)
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(limits.timeout) + 1
    rlimits = [limits.memory_mb << 20, cpu, limits.file_mb << 20, limits.processes, 0]
    token = secrets.token_hex(16)
    outer = tempfile.mkdtemp(prefix="unmask-sandbox-")
    work = os.path.join(outer, "work")
    os.mkdir(work, 0o700)
    if iso.user is not None:
        os.chmod(outer, 0o711)
        os.chown(work, iso.user, iso.group)
    out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
    command = iso.prefix + [python, "-I", "-c", _LAUNCHER, *(str(v) for v in rlimits)]
    kwargs = {}
    if iso.user is not None and not iso.prefix:
        kwargs = {"user": iso.user, "group": iso.group, "extra_groups": []}
    started = time.perf_counter()
    fired = threading.Event()

    def expire(pid: int) -> None:
        fired.set()
        _kill_group(pid)

    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work,
                env=_environment(work), start_new_session=True, close_fds=True, **kwargs,
            )
            timer = threading.Timer(limits.timeout, expire, (proc.pid,))
            timer.start()
            try:
                proc.communicate((token + "\n" + source).encode("utf-8"))
            finally:
                timer.cancel()
                _kill_group(proc.pid)
                proc.wait()
        elapsed = time.perf_counter() - started
        stdout, stderr = _tail(out_path), _tail(err_path)
    finally:
        shutil.rmtree(outer, ignore_errors=True)
    code = proc.returncode
    finished = stdout.rstrip().endswith(token)
    if finished:
        stdout = stdout.rstrip()[: -len(token)].rstrip("\n")
    if code == 0 and finished:
        return RunResult("passed", 0, "", stdout, stderr, elapsed)
    if fired.is_set() or code == -signal.SIGXCPU:
        why = f"killed after {limits.timeout:g} s wall clock" if fired.is_set() else f"CPU limit of {cpu} s reached"
        return RunResult("timeout", code, why, stdout, stderr, elapsed)
    reason = _last_line(stderr) or ("exited before its end" if code == 0 else f"exit status {code}")
    return RunResult("failed", code, reason, stdout, stderr, elapsed)


def run_programs(
    sources: Sequence[str],
    limits: Limits | None = None,
    workers: int = 2,
    on_done: Callable[[int, RunResult], None] | None = None,
) -> list[RunResult]:
    """Run many programs, ``workers`` at a time; results in input order."""
    isolation()  # probe once before the threads start

    def one(i: int) -> RunResult:
        result = run_program(sources[i], limits)
        if on_done is not None:
            on_done(i, result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, range(len(sources))))
