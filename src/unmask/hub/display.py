"""How ``unmask list`` shows sizes and counts, and its table."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from unmask.hub.cache import cache_dir
from unmask.hub.listing import ModelEntry


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def print_models(entries: Sequence[ModelEntry]) -> None:
    """The table on stdout; one line per problem found on stderr."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", caption=f"cache: {cache_dir()}", caption_justify="left")
    table.add_column("name", overflow="fold")
    for column in ("family", "attention", "parameters", "size"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("parameters", "size") else "left")
    table.add_column("path", overflow="fold")
    problems = []
    for e in entries:
        name = Text(e.name)
        if e.status != "ok":
            name.append(" (incomplete)" if e.status == "incomplete download" else " (unreadable)", style="red")
            problems.append(f"{e.name}: {e.status}")
        table.add_row(name, e.family, e.attention, human_count(e.parameters), human_size(e.size_bytes), e.path)
    Console().print(table)
    for line in problems:
        print(line, file=sys.stderr)
