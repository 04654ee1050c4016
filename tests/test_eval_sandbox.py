"""The sandbox that runs model-written programs: limits, isolation, and telling pass from fail."""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap

import pytest

from unmask.eval.sandbox import Limits, isolation, run_program, run_programs


def test_a_passing_and_a_failing_program_are_told_apart() -> None:
    ok = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')\n")
    bad = run_program("def add(a, b):\n    return a - b\nassert add(2, 3) == 5\n")
    assert ok.outcome == "passed" and ok.passed and ok.stdout == "fine"
    assert bad.outcome == "failed" and not bad.passed and "AssertionError" in bad.reason
    broken = run_program("def f(:\n")
    assert broken.outcome == "failed" and "SyntaxError" in broken.reason


def test_a_program_must_run_to_its_end_to_pass() -> None:
    early = run_program("import sys\nsys.exit(0)\nraise AssertionError('never reached')\n")
    assert early.returncode == 0 and early.outcome == "failed"
    hard = run_program("import os\nos._exit(0)\n")
    assert hard.outcome == "failed"


def test_the_wall_clock_timeout_kills_an_infinite_loop() -> None:
    result = run_program("while True:\n    pass\n", Limits(timeout=1.0, cpu_seconds=60))
    assert result.outcome == "timeout" and "wall clock" in result.reason
    assert result.elapsed < 30


def test_the_cpu_limit_stops_a_busy_program() -> None:
    result = run_program("while True:\n    pass\n", Limits(timeout=60.0, cpu_seconds=1))
    assert result.outcome == "timeout" and "CPU limit" in result.reason


def test_the_memory_limit_stops_a_huge_allocation_but_not_a_modest_one() -> None:
    huge = run_program("block = bytearray(8 * 1024 ** 3)\n", Limits(memory_mb=512))
    assert huge.outcome == "failed" and "MemoryError" in huge.reason
    modest = run_program("block = bytearray(64 * 1024 ** 2)\nassert len(block) == 64 * 1024 ** 2\n", Limits(memory_mb=512))
    assert modest.passed, modest.stderr


def test_runaway_output_is_capped_by_the_file_size_limit() -> None:
    result = run_program("while True:\n    print('x' * 1000)\n", Limits(timeout=20, file_mb=1))
    assert result.outcome == "failed"  # writing past 1 MiB raises instead of filling the disk
    assert len(result.stdout) <= 4000


def test_files_stay_in_a_fresh_temporary_directory_that_is_removed() -> None:
    program = textwrap.dedent(
        """
        import os
        print(os.getcwd())
        print(sorted(os.listdir(".")))
        with open("note.txt", "w") as f:
            f.write("hello")
        print(os.path.abspath("note.txt"))
        print(os.environ["HOME"] == os.getcwd() == os.environ["TMPDIR"])
        """
    )
    first = run_program(program)
    second = run_program(program)
    assert first.passed and second.passed, first.stderr
    cwd, listing, note, home_is_cwd = first.stdout.splitlines()
    assert listing == "[]" and home_is_cwd == "True"
    assert note == os.path.join(cwd, "note.txt")
    assert os.path.realpath(cwd).startswith(os.path.realpath(tempfile.gettempdir()))
    assert cwd != os.getcwd()
    assert second.stdout.splitlines()[0] != cwd  # each program gets its own directory
    assert not os.path.exists(cwd)  # and it is gone afterwards


def test_the_environment_is_scrubbed_and_the_process_is_separate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNMASK_TEST_SECRET", "do-not-leak")
    result = run_program("import os, sys\nprint(sorted(os.environ))\nprint(os.getpid())\nprint(sys.flags.isolated)\n")
    names, pid, isolated = result.stdout.splitlines()
    assert "UNMASK_TEST_SECRET" not in names and "PYTHONPATH" not in names
    assert int(pid) != os.getpid()
    assert isolated == "1"


def test_no_network_where_the_os_allows_it() -> None:
    if not isolation().network:
        pytest.skip("this machine allows no network namespace; the sandbox says so in its reports")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\n")
        server.settimeout(0.2)
        with pytest.raises(OSError):
            server.accept()  # a connection that had got through would be waiting in the backlog
    assert result.outcome == "failed" and "Error" in result.reason
    control = run_program("print(1)")
    assert control.passed


def test_many_programs_run_in_parallel_and_come_back_in_order() -> None:
    sources = [f"assert {i} % 3 != 0\nprint({i})\n" for i in range(9)]
    done: list[int] = []
    results = run_programs(sources, Limits(), workers=3, on_done=lambda i, r: done.append(i))
    assert [r.passed for r in results] == [i % 3 != 0 for i in range(9)]
    assert [r.stdout for r in results if r.passed] == [str(i) for i in range(9) if i % 3 != 0]
    assert sorted(done) == list(range(9))
