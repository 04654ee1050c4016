"""Programs written to escape the eval sandbox or to forge a pass.

Each layer is asserted where ``isolation()`` says this machine provides it; a layer it reports
missing is skipped by name (so the report, not the test, tells what this machine lacks).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from unmask.eval.sandbox import Limits, isolation, run_program

ISO = isolation()


MISSING_NAMES = {"filesystem": "mount namespace", "pid": "pid namespace", "user": "unprivileged user"}


def need(layer: str) -> None:
    """Skip only when the sandbox itself reports the layer missing on this machine."""
    missing = " ".join(getattr(ISO, "missing", []))
    if MISSING_NAMES[layer] in missing or (layer == "filesystem" and "filesystem" in missing):
        pytest.skip(f"this machine has no {layer} layer; the sandbox reports it missing: {missing}")


def run(source: str, **limits) -> object:
    return run_program(textwrap.dedent(source), Limits(**limits) if limits else None)


def test_no_layer_is_missing_silently():
    described = ISO.describe()
    assert set(described) >= {"network", "user", "filesystem", "pid", "limits", "verdict", "missing"}
    if os.geteuid() == 0 and ISO.user is None:  # the old sandbox ran programs as root without a word
        assert "unprivileged user" in described["missing"]
    uid = int(run("import os\nprint(os.getuid())\n").stdout)
    assert (uid != 0) == (ISO.user is not None or ISO.nested_userns or os.geteuid() != 0)


def test_a_program_cannot_write_outside_its_directory(tmp_path):
    need("filesystem")
    os.chmod(tmp_path, 0o777)  # even a world-writable directory is out of reach
    name = f"unmask-escape-{uuid.uuid4().hex}"
    targets = [str(tmp_path / name), f"/tmp/{name}", f"/dev/shm/{name}", f"/var/tmp/{name}", str(Path.cwd() / name)]
    result = run(f"""
        import os
        wrote = []
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                wrote.append(path)
            except OSError:
                pass
        with open("inside.txt", "w") as f:
            f.write("fine")
        print(wrote)
    """)
    assert result.passed, result.stderr
    assert result.stdout == "[]"
    escaped = [t for t in targets if os.path.exists(t)]
    for path in escaped:
        os.remove(path)
    assert escaped == []


def test_a_program_cannot_read_root_only_files(tmp_path):
    need("user")
    secret = tmp_path / "secret.txt"
    secret.write_text("root only")
    os.chmod(secret, 0o600)
    os.chmod(tmp_path, 0o755)
    result = run(f"""
        found = []
        for path in [{str(secret)!r}, "/etc/shadow", "/root/.bashrc", "/root/.ssh/id_rsa"]:
            try:
                found.append(open(path).read()[:20])
            except OSError:
                pass
        print(found)
    """)
    assert result.passed, result.stderr
    assert result.stdout == "[]"


def test_a_program_cannot_fork_or_start_threads():
    result = run("""
        import os, threading, subprocess
        failures = 0
        for attempt in (os.fork, lambda: threading.Thread(target=print).start(),
                        lambda: subprocess.run(["true"]), lambda: os.system("true")):
            try:
                attempt()
            except (OSError, RuntimeError):
                failures += 1
        print(failures)
    """)
    assert result.passed, result.stderr
    assert result.stdout == "4"


def test_the_evaluator_and_its_environment_are_out_of_reach(monkeypatch):
    need("pid")
    monkeypatch.setenv("UNMASK_EVALUATOR_SECRET", "do-not-leak")
    bystander = subprocess.Popen(["sleep", "60"])  # stands in for the evaluator: root's process, outside
    try:
        result = run(f"""
            import os, signal
            seen = []
            for pid in (os.getppid(), 1, {os.getpid()}, {bystander.pid}):
                try:
                    seen.append(open(f"/proc/{{pid}}/environ").read())
                except OSError:
                    pass
                try:
                    os.kill(pid, signal.SIGKILL)
                    seen.append(f"killed {{pid}}")
                except OSError:
                    pass
            print(seen, os.listdir("/proc"))
        """)
        assert result.passed, result.stderr
        assert result.stdout == "[] []"
        assert "do-not-leak" not in result.stdout + result.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def _processes_with(marker: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_a_daemonised_child_dies_with_the_run():
    need("pid")
    result = run("""
        import os, sys, time
        print(sys._getframe(1).f_locals["address"][1:])  # in the launcher's command line: names its processes
        sys.stdout.flush()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        time.sleep(0.2)
    """, processes=8)
    assert result.passed, result.stderr
    marker = result.stdout.strip().encode()
    assert marker.startswith(b"unmask-sandbox-")
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(marker) == []


FORGERIES = {
    "exit status 0 halfway": "import os\nos._exit(0)\n",
    "reading the launcher's secret": (
        "import os, sys\nlauncher = sys._getframe(1)\n"
        "found = [v for v in {**launcher.f_globals, **launcher.f_locals}.values() if isinstance(v, str) and len(v) == 32]\n"
        "print('\\n' + (found or [''])[-1])\nsys.stdout.flush()\nos._exit(0)\n"
    ),
    "sys.exit(0) halfway": "import sys\nsys.exit(0)\n",
    "printing tokens then exiting": (
        "import os, sys\nfor n in range(64):\n    print(os.urandom(16).hex())\n"
        "print(open('/proc/self/cmdline').read() if os.path.exists('/proc/self/cmdline') else '')\nos._exit(0)\n"
    ),
    "writing to every descriptor": (
        "import os\nfor fd in range(1024):\n    try:\n        os.write(fd, b'done')\n    except OSError:\n        pass\n"
        "os._exit(0)\n"
    ),
    "connecting to the report socket": (
        "import os, socket, sys, gc\nframe = sys._getframe(1)\naddress = frame.f_locals['address']\n"
        "s = socket.socket(socket.AF_UNIX)\ns.connect(address)\ns.sendall(b'done')\nos._exit(0)\n"
    ),
    "calling the launcher again": (
        "import io, os, sys, __main__\nsys.stdin = io.StringIO('')\ntry:\n    __main__.main()\nfinally:\n"
        "    os._exit(0)\n"
    ),
    "from a signal handler": (
        "import io, os, signal, sys, time, __main__\n"
        "def again(*_):\n    sys.stdin = io.StringIO('')\n    __main__.main()\n"
        "signal.signal(signal.SIGALRM, again)\nsignal.setitimer(signal.ITIMER_REAL, 0.05)\ntime.sleep(1)\nos._exit(0)\n"
    ),
    "from an atexit handler": (
        "import atexit, io, sys, __main__\n"
        "def again():\n    sys.stdin = io.StringIO('')\n    __main__.main()\n"
        "atexit.register(again)\nsys.exit(0)\n"
    ),
    "through the hook's closure": (
        "import gc, os\nhooks = [o for o in gc.get_objects() if getattr(o, '__name__', '') == 'hook']\n"
        "for h in hooks:\n    for cell in h.__closure__:\n        cell.cell_contents = None\nos._exit(0)\n"
    ),
    "replacing the process": (
        "import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'print(1)'])\n"
    ),
    "through ctypes": "import ctypes\nctypes.CDLL(None)._exit(0)\n",
    "jumping over the tests": (
        "import sys\ndef trace(frame, event, arg):\n    return trace\nsys.settrace(trace)\n"
    ),
}


@pytest.mark.parametrize("how", sorted(FORGERIES))
def test_program_code_cannot_forge_a_pass(how):
    forged = run(FORGERIES[how] + "raise AssertionError('the tests ran and failed')\n", timeout=10)
    assert not forged.passed, (how, forged)


def test_honest_programs_still_pass_with_frames_typing_and_namedtuple():
    result = run("""
        import collections, dataclasses, inspect, logging, sys, traceback, typing
        Point = collections.namedtuple("Point", "x y")
        @dataclasses.dataclass
        class Box:
            size: typing.List[int]
        logging.getLogger("x").warning("a warning")
        try:
            raise ValueError("shown")
        except ValueError:
            text = traceback.format_exc()
        assert "shown" in text and inspect.currentframe() is not None and Point(1, 2).y == 2
        print(Box([1]).size, sys._getframe().f_code.co_name)
    """)
    assert result.passed, result.stderr
    assert result.stdout == "[1] <module>"
