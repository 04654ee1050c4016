"""A range a number must lie in, checked and described the same way by every front end.

The decoding settings (``unmask.decoding.settings``), the command line's flags and the server's
request fields all state their limits as a ``Bounds``, so a flag and the field it mirrors accept
and refuse the same values. The module imports nothing heavy: the torch-free commands use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """``low <= x <= high`` (``low < x`` when ``low_open``); None = no bound on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside (top_p > 0, factor > 0)

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` ("must be in [0, 1]"), or None when it lies inside."""
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and value > self.high
        return f"must be {self}" if below or above else None

    def pydantic(self) -> dict[str, Any]:
        """The same limits as pydantic ``Field`` constraints."""
        out: dict[str, Any] = {}
        if self.low is not None:
            out["gt" if self.low_open else "ge"] = self.low
        if self.high is not None:
            out["le"] = self.high
        return out

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"<= {high}" if self.high is not None else "any number"


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
