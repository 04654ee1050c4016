"""Reading a published checkpoint's ``config.json`` without trusting it.

Only JSON is read: ``auto_map`` and any ``modeling_*.py`` beside it are ignored, so no code from the
directory ever runs. Every problem is an ``UnmaskError`` naming the file and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError
from unmask.files import read_json_object

CONFIG_NAME = "config.json"
_MISSING = object()


class HFConfig:
    """The keys of one ``config.json`` with checked accessors that fail with the file and key named."""

    def __init__(self, data: dict[str, Any], path: Path) -> None:
        self.data = data
        self.path = path

    @classmethod
    def read(cls, path: Path) -> "HFConfig":
        return cls(read_json_object(path, missing_ok=False), path)

    @property
    def model_type(self) -> str:
        value = self.data.get("model_type")
        return value if isinstance(value, str) else ""

    @property
    def architectures(self) -> list[str]:
        value = self.data.get("architectures")
        return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []

    def fail(self, message: str) -> UnmaskError:
        return UnmaskError(f"{self.path}: {message}")

    def integer(self, key: str, default: Any = _MISSING, *, positive: bool = True) -> int | None:
        """An integer key; ``default`` when absent or null (a missing key without default is an error)."""
        value = self.data.get(key)
        if value is None:
            if default is _MISSING:
                raise self.fail(f"missing key {key!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
            raise self.fail(f"{key!r} must be a {'positive ' if positive else ''}integer, got {value!r}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self.fail(f"{key!r} must be a positive number, got {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"{key!r} must be true or false, got {value!r}")
        return value

    def token_id(self, key: str) -> int | None:
        """A special-token id: an integer, the first of a list, or null."""
        value = self.data.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{key!r} must be a token id, got {value!r}")
        return value

    def require(self, key: str, allowed: tuple[Any, ...], what: str) -> None:
        """Refuse a checkpoint whose ``key`` selects a variant unmask does not implement."""
        value = self.data.get(key, allowed[0])
        if value not in allowed:
            raise self.fail(
                f"{key!r} = {json.dumps(value)} is not supported for {what} (expected {json.dumps(allowed[0])})"
            )
