"""Running model-written Python programs behind an OS boundary, with a verdict they cannot forge.

Each program runs in its own ``python -I`` process, never in the evaluator's, started by a
small trusted wrapper. Layers, each used where this machine allows it (``isolation()`` probes
once and says which; a missing layer is named in every report, never silently dropped):

- **namespaces**: ``unshare --pid --mount --net --ipc --uts`` (plus ``--user`` when the
  evaluator is not root). The wrapper is PID 1 of the new PID namespace, so when it exits
  every process the program left (a ``setsid()`` + double-fork daemon included) is killed by
  the kernel; the evaluator's processes and environment are not visible; the network is empty.
- **file system**: in the new mount namespace everything is read-only except the program's
  fresh directory (its ``HOME``, ``TMPDIR`` and cwd); ``/proc`` is hidden; a directory on the
  interpreter's path that others may not enter (``/root``) is covered by an empty tmpfs and
  only the interpreter's own tree is bound back into it.
- **user**: the program runs as ``nobody`` with no capabilities and ``no_new_privs``; it cannot
  read root-only files, signal or trace the wrapper or the evaluator. (A non-root evaluator's
  programs run as its own uid, without capabilities, in a nested user namespace.)
- **limits**: ``RLIMIT_AS`` (address space), ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (any file,
  its own output included), ``RLIMIT_NPROC`` (0: no new processes or threads), no core dumps,
  a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``), and a wall-clock timeout
  after which the wrapper (and with it the namespace) is killed.
- **verdict**: a program passes only if it ran to its end and exited 0. The end is reported by
  the launcher connecting to a socket the wrapper listens on, after the program's last
  statement; the wrapper checks the peer is the program's process. Before that point an audit
  hook refuses every connect/bind, so program code cannot report an end it did not reach; it
  also refuses what could reach the hook or run code outside it (frames through ``gc``,
  tracing, ``ctypes``, sub-interpreters, new code objects, ``exec``/``fork``/``spawn``). Exit
  status 0 alone (``sys.exit(0)``, ``os._exit(0)`` halfway) does not pass, and nothing the
  program prints matters.

The threat model and what remains outside it are in docs/evaluation.md ("The sandbox").
"""

from __future__ import annotations

import functools
import json
import math
import os
import pwd
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

# The launcher: runs as the unprivileged user; the program's code runs inside ``main``'s exec.
# The end-of-program report may only come from ``main``'s own frame (depth 2, main thread), and
# main gets there only when exec returns: program code always runs deeper (or in another
# thread, which it cannot start). The hook holds no flag to flip; its closure could only be
# reached through ``gc``, which it refuses. Every exit but the report is ``os._exit`` (no atexit).
_LAUNCHER = r"""
def main():
    import _socket, _thread, os, resource, sys
    address, nproc = "\0" + sys.argv[1], int(sys.argv[2])
    if nproc >= 0:  # set here, after exec: set*id would otherwise count the wrapper's processes
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    source = sys.stdin.read()
    sys.stdin.close()
    sys.argv = ["program.py"]
    sys.addaudithook(_guard(sys._getframe().f_code, sys._getframe, _thread.get_ident, _thread.get_ident()))
    exit_, display = os._exit, sys.__excepthook__
    sock_type, unix, stream = _socket.socket, _socket.AF_UNIX, _socket.SOCK_STREAM
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as exc:  # an error or an early exit: the end was not reached
        status = 1
        if isinstance(exc, SystemExit) and (exc.code is None or isinstance(exc.code, int)):
            status = exc.code or 0
        elif isinstance(exc, SystemExit):
            print(exc.code, file=sys.stderr)
        else:
            display(type(exc), exc, exc.__traceback__)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:  # never through the interpreter's exit: atexit handlers are program code
            exit_(status & 0xFF)
    sock = sock_type(unix, stream)
    sock.connect(address)
    sock.sendall(b"done")
    exit_(0)


def _guard(main_code, getframe, ident, main_thread):
    denied = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
              "sys._current_frames", "code.__new__", "os.exec",
              "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn",
              "_thread.start_new_thread", "resource.prlimit"}
    modules = {"ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "_testmultiphase", "_xxsubinterpreters",
               "_xxinterpchannels", "_interpreters", "_ctypes_test", "_xxtestfuzz"}

    def hook(event, args):
        if event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            caller = getframe(1)
            if not (caller.f_code is main_code and caller.f_back is not None and caller.f_back.f_back is None
                    and ident() == main_thread):
                raise PermissionError("the sandbox has no network")
        elif event in denied or event.startswith("ctypes."):
            raise PermissionError(f"{event} is not allowed in the sandbox")
        elif event == "import" and isinstance(args[0], str) and str.partition(args[0], ".")[0] in modules:
            raise ImportError(f"module {args[0]} is not available in the sandbox")

    return hook


main()
"""

# The wrapper: trusted, runs before the program and outlives it (PID 1 of the new PID namespace
# when there is one). Sets up the file system view, starts the program as the unprivileged user
# with its limits, waits, and writes one JSON report to its report fd.
_WRAPPER = r"""
import ctypes, json, os, resource, secrets, socket, stat, struct, sys
cfg = json.loads(sys.argv[1])
report_fd = cfg["report_fd"]
layers, missing = {}, []
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 4096, 16384, 1 << 18
ATTR_RDONLY, ATTR_NOSUID, ATTR_NODEV, AT_RECURSIVE, SYS_MOUNT_SETATTR = 1, 2, 4, 0x8000, 442


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda v: None if v is None else v.encode()
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def mount_attr(path, set_=0, clear=0, recursive=False):
    attr = MountAttr(set_, clear, 0, 0)
    rc = libc.syscall(SYS_MOUNT_SETATTR, -100, path.encode(), AT_RECURSIVE if recursive else 0, ctypes.byref(attr),
                      ctypes.sizeof(attr))
    check(rc, f"mount_setattr {path}")


def hidden_ancestor(path):
    # the highest directory above ``path`` that others may not enter, or None
    parts, found = os.path.realpath(path).split(os.sep)[1:], None
    for i in range(1, len(parts)):
        d = os.sep + os.sep.join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return found


def build_view():
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    groups = {}
    for path in cfg["expose"]:
        top = hidden_ancestor(path)
        if top is not None:
            groups.setdefault(top, []).append(os.path.realpath(path))
    for k, (top, paths) in enumerate(groups.items()):
        staged = []
        for j, path in enumerate(paths):
            stage = os.path.join(cfg["outer"], f".expose-{k}-{j}")
            os.mkdir(stage, 0o700)
            mount(path, stage, None, MS_BIND | MS_REC)
            staged.append((stage, path))
        mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
        for stage, path in staged:
            os.makedirs(path, exist_ok=True)
            mount(stage, path, None, MS_BIND | MS_REC)
    mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0555,size=4k")
    mount_attr("/", set_=ATTR_RDONLY, recursive=True)
    mount(cfg["work"], cfg["work"], None, MS_BIND)
    mount_attr(cfg["work"], set_=ATTR_NOSUID | ATTR_NODEV, clear=ATTR_RDONLY)


if cfg["namespaces"]:
    try:
        build_view()
        layers["filesystem"] = "read-only except the program's directory; /proc hidden"
    except OSError as exc:
        missing.append(f"filesystem (read-only view failed: {exc})")
    layers["pid"] = "own PID namespace; killed whole at the end" if os.getpid() == 1 else "?"
    if os.getpid() != 1:
        missing.append("pid namespace")
    names = [n for _, n in socket.if_nameindex()]
    if names == ["lo"]:
        layers["network"] = "none (empty network namespace)"
    else:
        missing.append(f"network namespace (interfaces: {names})")
else:
    missing += ["pid namespace", "mount namespace (read-only view)", "network namespace"]

name = "unmask-sandbox-" + secrets.token_hex(8)
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind("\0" + name)
listener.listen(4)
uid, gid = cfg["uid"], cfg["gid"]
pid = os.fork()
if pid == 0:
    try:
        listener.close()
        os.close(report_fd)
        os.setsid()
        if uid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
        elif cfg["nested_userns"]:
            check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
        check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        for res, value in cfg["rlimits"]:
            soft = value
            hard = value + 1 if res == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, res), (soft, hard))
        os.chdir(cfg["work"])
        os.closerange(3, 65536)
        os.execve(cfg["python"], [cfg["python"], "-I", "-c", cfg["launcher"], name, str(cfg["nproc"])], cfg["env"])
    except BaseException as exc:
        os.write(2, f"sandbox: could not start the program: {exc}\n".encode())
    os._exit(127)
_, status = os.waitpid(pid, 0)
code = os.waitstatus_to_exitcode(status)
completed = False
listener.setblocking(False)
while True:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, OSError):
        break
    with conn:
        peer = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        conn.settimeout(1.0)
        try:
            data = conn.recv(16)
        except OSError:
            data = b""
        if peer == pid and data == b"done":
            completed = True
if not cfg["namespaces"]:
    try:
        os.killpg(pid, 9)
    except OSError:
        pass
os.write(report_fd, json.dumps({"returncode": code, "completed": completed, "layers": layers,
                                 "missing": missing}).encode())
"""

OUTPUT_TAIL = 4000  # characters of stdout/stderr kept in a result


@dataclass
class Limits:
    """What one program may use."""

    timeout: float = 5.0  # wall-clock seconds before the wrapper (and with it every process of the run) is killed
    memory_mb: int = 1024  # address space (RLIMIT_AS), interpreter included
    cpu_seconds: int | None = None  # RLIMIT_CPU; None = the timeout rounded up, plus one
    file_mb: int = 16  # largest file the program may write, its captured stdout/stderr included
    processes: int = 0  # RLIMIT_NPROC: new processes/threads allowed (not enforced where programs run as root)


@dataclass
class Isolation:
    """How programs are separated from the machine here (found once by probing)."""

    prefix: list[str] = field(default_factory=list)  # command before the wrapper (unshare ...); [] = none
    user: int | None = None  # uid programs run as (root evaluators: nobody); None = the evaluator's uid
    group: int | None = None  # gid to go with ``user``
    nested_userns: bool = False  # non-root evaluator: programs shed capabilities in a nested user namespace
    layers: dict[str, str] = field(default_factory=dict)  # what the probe found in place, by layer
    missing: list[str] = field(default_factory=list)  # layers this machine does not allow

    @property
    def network(self) -> bool:
        """True: programs get an empty network namespace."""
        return "network" in self.layers

    def describe(self) -> dict[str, str]:
        who = "nobody" if self.user is not None else f"the evaluator's user ({pwd.getpwuid(os.geteuid()).pw_name})"
        if self.nested_userns:
            who += ", without capabilities (nested user namespace)"
        return {
            "process": "separate python -I process per program under a trusted wrapper",
            "network": self.layers.get("network", "NOT isolated (no network namespace allowed here)"),
            "user": who,
            "filesystem": self.layers.get("filesystem", "NOT isolated (the program sees the file system as its user)"),
            "pid": self.layers.get("pid", "NOT isolated (no PID namespace: a daemonised child may outlive the run)"),
            "limits": "RLIMIT_AS, RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NPROC" + ("" if self.user is not None or
                                                                          self.nested_userns else " (NPROC not enforced for root)"),
            "verdict": "end-of-program report on a socket only the launcher may use; exit status 0 alone never passes",
            "missing": ", ".join(self.missing) or "none",
        }


@dataclass
class RunResult:
    """The outcome of one program."""

    outcome: str  # "passed" (ran to its end, status 0) | "failed" | "timeout"
    returncode: int | None  # exit status; negative = killed by that signal
    reason: str  # one line: the exception or why it was killed ("" when passed)
    stdout: str  # last OUTPUT_TAIL characters of stdout (a passed program's: trailing newlines removed)
    stderr: str  # last OUTPUT_TAIL characters of stderr
    elapsed: float  # wall-clock seconds

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


def _nobody() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _expose(python: str) -> list[str]:
    """The interpreter's trees, which the program's user must be able to reach."""
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), os.path.dirname(os.path.realpath(python))}
    return sorted(p for p in paths if os.path.isdir(p))


def _candidates(python: str) -> list[Isolation]:
    unshare = shutil.which("unshare")
    root = os.geteuid() == 0
    nobody = _nobody() if root else None
    flags = ["--pid", "--mount", "--net", "--ipc", "--uts", "--fork", "--kill-child"]
    options = []
    if unshare:
        if root:
            options.append(Isolation([unshare, *flags, "--"], *(nobody or (None, None))))
        else:
            options.append(Isolation([unshare, "--user", "--map-root-user", *flags, "--"], nested_userns=True))
    options.append(Isolation([], *(nobody or (None, None))))
    options.append(Isolation([]))
    return options


@functools.lru_cache(maxsize=None)
def isolation(python: str = sys.executable) -> Isolation:
    """The most isolated way to run ``python`` that works here, with the layers it provides."""
    for option in _candidates(python):
        result, report = _run(option, "import os\nprint(os.getuid())\n", Limits(timeout=30), python)
        if result.passed and report is not None:
            option.layers = dict(report["layers"])
            option.missing = list(report["missing"])
            if option.user is None and not option.nested_userns:
                option.missing.append("unprivileged user (programs run as the evaluator's user)")
            return option
    return Isolation(missing=["every layer (the sandbox wrapper does not start here)"])


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
    """Run ``source`` as a program in a fresh sandbox and report how it ended."""
    return _run(isolation(python), source, limits or Limits(), python)[0]


def _run(iso: Isolation, source: str, limits: Limits, python: str) -> tuple[RunResult, dict | None]:
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(limits.timeout) + 1
    rlimits = [("RLIMIT_AS", limits.memory_mb << 20), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", limits.file_mb << 20),
               ("RLIMIT_CORE", 0)]
    outer = tempfile.mkdtemp(prefix="unmask-sandbox-")
    work = os.path.join(outer, "work")
    os.mkdir(work, 0o700)
    os.chmod(outer, 0o711)
    if iso.user is not None:
        os.chown(work, iso.user, iso.group)
    out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
    report_r, report_w = os.pipe()
    config = {
        "report_fd": report_w, "namespaces": bool(iso.prefix), "expose": _expose(python) if iso.user is not None else [],
        "outer": outer, "work": work, "uid": iso.user, "gid": iso.group, "nested_userns": iso.nested_userns,
        "rlimits": rlimits, "nproc": limits.processes, "python": python, "launcher": _LAUNCHER,
        "env": _environment(work),
    }
    command = iso.prefix + [sys.executable, "-I", "-c", _WRAPPER, json.dumps(config)]
    started = time.perf_counter()
    fired = threading.Event()
    report_bytes = b""

    def expire(pid: int) -> None:
        fired.set()
        _kill_group(pid)

    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=outer, env=_environment(work),
                start_new_session=True, close_fds=True, pass_fds=(report_w,),
            )
            os.close(report_w)
            report_w = -1
            timer = threading.Timer(limits.timeout, expire, (proc.pid,))
            timer.start()
            try:
                chunks: list[bytes] = []
                reader = threading.Thread(target=_read_all, args=(report_r, chunks))
                reader.start()
                try:
                    proc.communicate(source.encode("utf-8"))
                except BrokenPipeError:
                    pass
            finally:
                timer.cancel()
                _kill_group(proc.pid)
                proc.wait()
                reader.join()
            report_bytes = b"".join(chunks)
        elapsed = time.perf_counter() - started
        stdout, stderr = _tail(out_path), _tail(err_path)
    finally:
        if report_w >= 0:
            os.close(report_w)
        os.close(report_r)
        shutil.rmtree(outer, ignore_errors=True)
    try:
        report = json.loads(report_bytes) if report_bytes else None
    except ValueError:
        report = None
    code = report["returncode"] if report else proc.returncode
    if report is not None and report["completed"] and code == 0:
        return RunResult("passed", 0, "", stdout.rstrip("\n"), stderr, elapsed), report
    if fired.is_set() or code == -signal.SIGXCPU:
        why = f"killed after {limits.timeout:g} s wall clock" if fired.is_set() else f"CPU limit of {cpu} s reached"
        return RunResult("timeout", code, why, stdout, stderr, elapsed), report
    if report is None:
        reason = f"the sandbox wrapper failed: {_last_line(stderr) or f'exit status {proc.returncode}'}"
    else:
        reason = _last_line(stderr) or ("exited before its end" if code == 0 else f"exit status {code}")
    return RunResult("failed", code, reason, stdout, stderr, elapsed), report


def _read_all(fd: int, chunks: list[bytes]) -> None:
    while True:
        data = os.read(fd, 65536)
        if not data:
            return
        chunks.append(data)


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
