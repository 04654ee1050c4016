"""A request body from bytes to a validated schema, with every hostile shape refused as a 400.

The gate has already capped the body's size. Here, before ``json.loads`` runs, the nesting
depth is measured on the bytes (strings blanked out first), so a body nested a thousand deep
is a 400 instead of a ``RecursionError``. After parsing, every string in the body (keys
included) must be encodable as UTF-8: JSON's ``\\ud800`` escapes can produce lone surrogates,
which no tokenizer, template or response encoder can take. Checking the whole tree at the
boundary covers every text field, present and future, at once.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from unmask.serve.errors import bad_request, from_validation

MAX_DEPTH = 32  # deepest nesting of objects/arrays a body may have (the schemas need 4)

Body = TypeVar("Body", bound=BaseModel)

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, strings ignored (exact for valid JSON)."""
    skeleton = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    if skeleton.size == 0:
        return 0
    step = np.isin(skeleton, _OPEN).astype(np.int32) - np.isin(skeleton, _CLOSE).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


def parse_body(raw: bytes, schema: type[Body], max_depth: int = MAX_DEPTH) -> Body:
    """The JSON object in ``raw`` validated against ``schema``; any problem is a 400 naming it."""
    if raw.count(b"[") + raw.count(b"{") > max_depth and nesting_depth(raw) > max_depth:
        raise bad_request(f"the body is nested more than {max_depth} levels deep", code="invalid_json")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"malformed JSON body: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the body must be a JSON object, got {type(data).__name__}")
    bad = unencodable_path(data)
    if bad is not None:
        where = ".".join(bad) or None
        raise bad_request(f"{where + ': ' if where else ''}text is not valid Unicode (a lone UTF-16 surrogate?)",
                          param=where, code="invalid_text")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise from_validation(list(exc.errors())) from None


def unencodable_path(data: Any) -> list[str] | None:
    """Path to the first string (value or key) that cannot be encoded as UTF-8, or None."""
    stack: list[tuple[Any, list[str]]] = [(data, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    return path
                stack.append((item, [*path, key]))
        elif isinstance(value, list):
            stack.extend((item, [*path, str(i)]) for i, item in enumerate(value))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")
