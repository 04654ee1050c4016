"""What a training run reports: a JSONL metrics log and a progress display on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the checkpoint's step.

    ``keep_through`` None starts a fresh log; an int keeps the records with step <= it, so the
    log of a resumed run reads as if the run had never stopped.
    """

    def __init__(self, path: Path, keep_through: int | None) -> None:
        kept: list[str] = []
        if keep_through is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_through:
                        kept.append(line)
                except ValueError:
                    continue
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics log, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A rich progress bar (loss, tokens/s, ETA) when stderr is a terminal, plain lines otherwise."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.live = enabled and sys.stderr.isatty()
        self.bar: RichProgress | None = None
        self.rate = 0.0
        if self.live:
            self.bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("train", total=total, completed=done, info="")

    def __enter__(self) -> "Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, info=f"loss {loss:.4f}  {self.rate:,.0f} tok/s")

    def note(self, done: int, loss: float, tokens_per_s: float, val_ppl: float | None) -> None:
        """A logged step: refresh the rate shown, and print a line when there is no live bar."""
        self.rate = tokens_per_s
        if self.enabled and not self.live:
            val = "" if val_ppl is None else f"  val_ppl {val_ppl:.3f}"
            print(f"step {done}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s{val}", file=sys.stderr, flush=True)
