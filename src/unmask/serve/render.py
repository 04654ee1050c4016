"""Chat templates rendered in worker processes the server can kill.

A model's chat template is code from its directory. Jinja's sandbox keeps it from Python's
internals, and ``unmask.chat_template`` bounds ``*``, ``**`` and the output, but nothing inside
a process bounds the time of nested loops, and a thread cannot be stopped. So each render goes
to a worker process (``python -m unmask.chat_template``, its address space capped); one that
has not answered within ``timeout_s`` is killed and replaced, and the request gets an error.
Requests wait for a free worker; the other requests of the server never wait on a render.
"""

from __future__ import annotations

import json
import os
import queue
import select
import struct
import subprocess
import sys
import time
from typing import Any

from unmask.chat_template import write_message
from unmask.errors import UnmaskError


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "unmask.chat_template"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        write_message(self.proc.stdin, request)
        header = self._read(4, deadline)
        (size,) = struct.unpack(">I", header)
        return json.loads(self._read(size, deadline).decode("utf-8"))

    def _read(self, size: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        chunks, got = [], 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


class TemplateRenderer:
    """A pool of render workers (started on first use); ``render`` matches ``tokenizer.Renderer``."""

    def __init__(self, timeout_s: float = 2.0, max_chars: int = 1 << 20, workers: int = 2) -> None:
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._slots: queue.Queue[_Worker | None] = queue.Queue()
        for _ in range(workers):
            self._slots.put(None)
        self._closed = False

    def render(self, template: str, messages: list, add_generation_prompt: bool, names: dict) -> str:
        try:
            worker = self._slots.get(timeout=self.timeout_s * 4)
        except queue.Empty:
            raise UnmaskError("every chat template worker is busy; try again") from None
        try:
            if self._closed:
                raise UnmaskError("the server is shutting down")
            if worker is None or not worker.alive():
                worker = _Worker()
            request = {"template": template, "messages": messages, "add_generation_prompt": add_generation_prompt,
                       "names": names, "max_chars": self.max_chars}
            try:
                reply = worker.ask(request, time.monotonic() + self.timeout_s)
            except TimeoutError:
                worker.kill()
                worker = None
                raise UnmaskError(f"chat template took longer than {self.timeout_s:g} s to render") from None
            except (EOFError, OSError, ValueError, struct.error):
                worker.kill()
                worker = None
                raise UnmaskError("chat template rendering failed (its worker process died: out of memory?)") from None
        finally:
            if self._closed and worker is not None:
                worker.kill()
            self._slots.put(worker)
        if "error" in reply:
            raise UnmaskError(str(reply["error"]))
        return str(reply["text"])

    def close(self) -> None:
        """Stop every worker (idle ones at once; busy ones as they come back)."""
        self._closed = True
        while True:
            try:
                worker = self._slots.get_nowait()
            except queue.Empty:
                return
            if worker is not None:
                worker.kill()
