"""What every evaluation returns: a table for the terminal and a JSON record for files."""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmask.errors import UnmaskError
from unmask.loading import LoadedModel


@dataclass
class Report:
    """One evaluation's outcome."""

    title: str  # table title, e.g. "HumanEval pass@1"
    columns: list[str]  # table header
    rows: list[list[Any]]  # table body (already formatted or plain numbers)
    notes: list[str] = field(default_factory=list)  # lines printed under the table (what is a bound, what was cut)
    data: dict[str, Any] = field(default_factory=dict)  # the full JSON record


def model_facts(loaded: LoadedModel) -> dict[str, Any]:
    """Which model was evaluated, as recorded in every report."""
    cfg = loaded.model.config
    return {
        "path": str(loaded.path),
        "attention": cfg.attention,
        "parameters": loaded.model.num_params(),
        "context": cfg.max_seq_len,
        "vocab": cfg.vocab_size,
    }


def environment(loaded: LoadedModel) -> dict[str, Any]:
    """Where the evaluation ran: device, torch, Python, threads."""
    device = next(loaded.model.parameters()).device
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info.update(threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    return info


def show(report: Report) -> None:
    """Print the table (stdout) and its notes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(*report.columns, title=report.title, header_style="bold")
    for row in report.rows:
        table.add_row(*(escape(_cell(v)) for v in row))
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    for note in report.notes:
        console.print(f"[dim]{escape(note)}[/dim]", highlight=False)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def write_json(report: Report, path: str | Path) -> None:
    """Write ``report.data`` (plus title and notes) to ``path``."""
    record = {"title": report.title, **report.data, "notes": report.notes}
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UnmaskError(f"cannot write {target}: {exc.strerror or exc}") from None


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Any]:
    """A transient progress bar on stderr; yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)
