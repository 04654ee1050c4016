"""Token healing: back a prompt up to a token boundary and make the output start with what was cut.

A prompt that ends where the tokenizer would have merged across the boundary ("def f(x):\\n"
ends in a lone "\\n", while in training text the newline and the next line's indentation are one
token) asks the model to continue from a token split it rarely saw. Healing:

- **What is removed.** The longest tail of the prompt's tokens whose bytes are a proper prefix of
  some vocabulary token: a token that continues past the prompt's end could start at that tail's
  first byte, so the boundary before it is the last one the tokenizer would keep whatever text
  follows. Special tokens (chat markup, BOS) are never removed, at least one token is kept, and a
  tail can only be shorter than the longest token. Nothing is removed when no token extends the tail.
- **What is constrained.** The generated tokens must spell the removed bytes ``R`` before anything
  else: each token either starts with the bytes of ``R`` still owed (it completes them) or is a
  proper prefix of them (the next one continues), e.g. ``"\\n    "`` may come back as ``"\\n   "`` +
  ``" return"``. Special tokens cannot appear until ``R`` is complete. The original tail is always
  one allowed spelling.
- **What is returned.** Decoders return the generated ids, ``R`` included; the text layer
  (``completion_text``) drops the first ``len(R)`` bytes, so the completion a user sees continues
  their prompt as typed: ``prompt_text + completion == decode(kept_ids + generated_ids)``.

The constraint works on ids and bytes only (``TokenTable`` is built once per tokenizer), so
decoders and the engine get per-row ``Healing`` objects, never a tokenizer. Every decoding path
calls ``restrict`` on its (filtered) logits before picking tokens: it masks each constrained
position, left to right, given the region's decided tokens and the tokens just picked to its left,
and keeps only tokens after which the whole constraint can still be met (a diffusion canvas fills
in out of order, so a decided token to the right counts too). Picks of one call are therefore
consistent with each other, and any subset of them that a policy commits leaves the constraint
satisfiable. Shifted models need nothing special: the mask applies to the prediction of a region
position, wherever its logits were read.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from unmask.tokenizer import Tokenizer


class TokenTable:
    """Byte strings of a tokenizer's ordinary tokens (specials excluded), sorted for prefix queries."""

    def __init__(self, pieces: Sequence[bytes | None]) -> None:
        self.size = len(pieces)  # ids 0..size-1; larger ids (padded embeddings) are never allowed
        self.pieces = list(pieces)  # bytes of each id; None for specials and empty tokens
        ordered = sorted((b, i) for i, b in enumerate(pieces) if b)
        self.keys = [b for b, _ in ordered]  # sorted byte strings
        self.ids = torch.tensor([i for _, i in ordered], dtype=torch.long)  # id of each key
        self.longest = max((len(b) for b in self.keys), default=0)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenTable:
        """The table of ``tokenizer``, built on first use and cached while the tokenizer lives."""
        table = _TABLES.get(tokenizer)
        if table is None:
            special = tokenizer.special_ids
            pieces = [None if i in special else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
            table = _TABLES[tokenizer] = cls(pieces)
        return table

    def _range(self, prefix: bytes) -> tuple[int, int]:
        """[lo, hi) of the keys that start with ``prefix``."""
        lo = bisect.bisect_left(self.keys, prefix)
        # keys starting with ``prefix`` run from lo to the first key >= its successor
        stripped = prefix.rstrip(b"\xff")
        if stripped:
            successor = stripped[:-1] + bytes([stripped[-1] + 1])
            hi = bisect.bisect_left(self.keys, successor, lo)
        else:
            hi = len(self.keys)
        return lo, hi

    def extensions(self, prefix: bytes) -> Tensor:
        """Ids of the tokens whose bytes start with ``prefix`` (``prefix`` itself included)."""
        lo, hi = self._range(prefix)
        return self.ids[lo:hi]

    def extends(self, prefix: bytes) -> bool:
        """Whether some token is longer than ``prefix`` and starts with it."""
        lo, hi = self._range(prefix)
        return hi - lo > 1 or (hi - lo == 1 and self.keys[lo] != prefix)

    def exact(self, data: bytes) -> list[int]:
        """Ids whose bytes are exactly ``data``."""
        lo = bisect.bisect_left(self.keys, data)
        hi = bisect.bisect_right(self.keys, data, lo)
        return self.ids[lo:hi].tolist()


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

UNDECIDED = -1  # a region slot whose token is not known yet (for ``Healing.allowed``)


@dataclass
class Healing:
    """One row's constraint: its generated tokens must spell ``removed`` before anything else."""

    table: TokenTable
    removed: bytes  # the bytes cut from the end of the prompt (non-empty)
    _complete: dict[tuple[int, int, str], Tensor] = field(default_factory=dict, repr=False)

    # States: o in 0..m-1 = bytes of ``removed`` spelled so far; m = done (anything goes); None = dead.
    def _step(self, state: int, token: int) -> int | None:
        m = len(self.removed)
        if state == m:
            return m
        piece = self.table.pieces[token] if 0 <= token < self.table.size else None
        if not piece:
            return None
        rest = self.removed[state:]
        if piece.startswith(rest):
            return m
        if rest.startswith(piece):
            return state + len(piece)
        return None

    def _successors(self, state: int) -> dict[int, list[int] | None]:
        """States an undecided slot can lead to from ``state``: done (via any token that completes the
        rest; None stands for that id set) or ``state + len(p)`` via the tokens ``p`` that are proper
        prefixes of the rest (their ids)."""
        m = len(self.removed)
        if state == m:
            return {m: None}
        rest = self.removed[state:]
        out: dict[int, list[int] | None] = {}
        if self.table.extensions(rest).numel():
            out[m] = None
        for k in range(1, len(rest)):
            ids = self.table.exact(rest[:k])
            if ids:
                out[state + k] = ids
        return out

    def _next(self, state: int, token: int) -> set[int]:
        if token == UNDECIDED:
            return set(self._successors(state))
        nxt = self._step(state, token)
        return set() if nxt is None else {nxt}

    def allowed(self, region: Sequence[int], position: int, vocab: int, device: torch.device) -> Tensor | None:
        """Bool mask [vocab] of the tokens ``position`` may take so that the constraint can still be met
        given ``region`` (``UNDECIDED`` where unknown); None when the position is unconstrained."""
        m = len(self.removed)
        span = min(len(region), m)  # every token has a byte, so after m slots the text is spelled
        if position >= span:
            return None
        reach = {0}
        for p in range(position):
            reach = set().union(*(self._next(o, region[p]) for o in reach))
        if reach == {m}:
            return None
        feasible = {m}  # states from which slots position+1 .. span-1 can finish the constraint
        for p in range(span - 1, position, -1):
            feasible = {o for o in range(m + 1) if self._next(o, region[p]) & feasible}
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        for o in sorted(reach):
            if o == m:
                return None  # the constraint may already be met here: anything goes
            for nxt, ids in self._successors(o).items():
                if nxt not in feasible:
                    continue
                if ids is None:
                    mask |= self._completions(o, vocab, device)
                else:
                    mask[torch.tensor([i for i in ids if i < vocab], dtype=torch.long, device=device)] = True
        return mask

    def _completions(self, state: int, vocab: int, device: torch.device) -> Tensor:
        key = (state, vocab, str(device))
        if key not in self._complete:
            ids = self.table.extensions(self.removed[state:])
            mask = torch.zeros(vocab, dtype=torch.bool)
            mask[ids[ids < vocab]] = True
            self._complete[key] = mask.to(device)
        return self._complete[key]

    def satisfied(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` (all decided) spell ``removed`` first."""
        state: int | None = 0
        for t in tokens:
            state = self._step(state, t)
            if state is None or state == len(self.removed):
                break
        return state == len(self.removed)


@dataclass
class Slots:
    """Where one row's predictions sit in a flat logits tensor, for ``restrict``."""

    heal: Healing
    region: list[int]  # the row's generated region, ``UNDECIDED`` where not decided
    positions: list[int]  # undecided region positions predicted by this call
    rows: list[int]  # the flat index of each one's scores


def restrict(scores: Tensor, rows: Sequence[Slots | None], pick: Callable[[int], int]) -> None:
    """Mask ``scores`` [M, V] in place: -inf for tokens a constrained position may not take.

    Each row's positions are taken left to right; ``pick(k)`` must return the token the caller will
    choose for flat row ``k`` from the (already masked) scores, so that later positions are
    constrained given it. Rows that are None, and positions past the constraint, are left alone.
    """
    vocab = scores.shape[-1]
    for slots in rows:
        if slots is None:
            continue
        region = list(slots.region)
        for pos, k in sorted(zip(slots.positions, slots.rows)):
            mask = slots.heal.allowed(region, pos, vocab, scores.device)
            if mask is None:  # met (or may be met) before ``pos``: this and every later position are free
                break
            scores[k] = scores[k].masked_fill(~mask, float("-inf"))
            region[pos] = pick(k)


# ---------------------------------------------------------------------------- the text side


@dataclass
class Healed:
    """A prompt backed up to a kept token boundary."""

    ids: list[int]  # the prompt ids to decode from
    heal: Healing | None  # the constraint on the output; None when nothing was removed

    @property
    def removed(self) -> bytes:
        return self.heal.removed if self.heal is not None else b""


def heal(tokenizer: Tokenizer, ids: Sequence[int], enabled: bool = True) -> Healed:
    """Remove the longest tail of ``ids`` whose bytes some longer token starts with (see the module
    docstring); ``enabled=False`` returns the prompt unchanged."""
    ids = list(ids)
    if not enabled or len(ids) < 2:
        return Healed(ids, None)
    table = TokenTable.of(tokenizer)
    tail, best = b"", 0
    for k in range(1, len(ids)):
        piece = table.pieces[ids[-k]] if 0 <= ids[-k] < table.size else None
        if not piece:
            break  # a special token is a boundary the text never crosses
        tail = piece + tail
        if len(tail) >= table.longest:
            break
        if table.extends(tail):
            best = k
    if best == 0:
        return Healed(ids, None)
    removed = b"".join(table.pieces[i] or b"" for i in ids[-best:])
    return Healed(ids[:-best], Healing(table, removed))


def heal_batch(tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], enabled: bool = True) -> tuple[list[list[int]], list[Healing | None] | None]:
    """``heal`` for many prompts: the kept ids, and the per-row constraints (None when none applies)."""
    healed = [heal(tokenizer, p, enabled) for p in prompts]
    heals = [h.heal for h in healed]
    return [h.ids for h in healed], (heals if any(h is not None for h in heals) else None)


def completion_text(tokenizer: Tokenizer, ids: Sequence[int], heal: Healing | None) -> str:
    """The text of generated ``ids`` as a continuation of the prompt the user typed: the removed
    bytes are dropped from its start. Without healing it is ``tokenizer.decode(ids)``."""
    if heal is None:
        return tokenizer.decode(ids)
    data = b"".join(tokenizer.token_bytes(int(i)) for i in ids if int(i) not in tokenizer.special_ids)
    return data[len(heal.removed) :].decode("utf-8", errors="replace")
