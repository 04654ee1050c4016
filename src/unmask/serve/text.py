"""From a request's token canvas to the text a client sees.

A diffusion canvas fills in out of order, but its *settled prefix* (the tokens before the first
still-masked position) never changes again, so its text can be streamed as it grows. The
tracker turns that prefix into text deltas whose concatenation is always the final text: it
holds back a character whose UTF-8 bytes are not all there yet and any tail that could be the
start of a stop string, and it cuts the text at the first stop string. Streaming and
non-streaming responses both go through it, so they agree exactly.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from unmask.serve.schemas import Canvas
from unmask.tokenizer import Tokenizer


class TextTracker:
    """Settled tokens -> settled text -> deltas safe to send."""

    def __init__(self, tokenizer: Tokenizer, ends: set[int], stops: Sequence[str], skip: int = 0) -> None:
        self.tokenizer = tokenizer
        self.cut = skip  # leading bytes of the answer that are not its text (token healing re-spells the prompt's tail)
        self._skip = skip  # of those, the ones not consumed yet
        self.ends = ends  # token ids that end the answer (EOS, pad, end-of-turn)
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []  # settled tokens consumed so far (no end token)
        self.text = ""  # text of the settled tokens, complete characters only, cut at a stop string
        self.sent = 0  # characters of ``text`` already handed out by ``delta``
        self.ended = False  # an end token was reached: nothing after it counts
        self.stopped = False  # a stop string was found: ``text`` ends before it
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def done(self) -> bool:
        return self.ended or self.stopped

    def advance(self, canvas: Sequence[int], undecided: int) -> None:
        """Consume the newly settled tokens of ``canvas`` (undecided positions hold ``undecided``)."""
        i = len(self.ids)
        while not self.done and i < len(canvas) and canvas[i] != undecided:
            self._consume(int(canvas[i]))
            i += 1

    def finish(self, tokens: Sequence[int]) -> None:
        """The answer is over: consume the rest of ``tokens`` and flush any pending bytes."""
        for token in tokens[len(self.ids):]:
            if self.done:
                break
            self._consume(int(token))
        if not self.stopped:
            self._append(self._decoder.decode(b"", final=True))

    def delta(self, final: bool = False) -> str:
        """Text not sent yet that can no longer change (all of it when ``final``)."""
        end = len(self.text) if final or self.done else len(self.text) - self._stop_prefix_len()
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def _consume(self, token: int) -> None:
        if token in self.ends:
            self.ended = True
            return
        self.ids.append(token)
        if token not in self.tokenizer.special_ids:
            data = self.tokenizer.token_bytes(token)
            data, self._skip = data[self._skip :], max(self._skip - len(data), 0)
            self._append(self._decoder.decode(data))

    def _append(self, piece: str) -> None:
        if not piece:
            return
        start = max(len(self.text) - max((len(s) for s in self.stops), default=0) + 1, 0)
        self.text += piece
        # The stop that completes first, character by character, wins (the earlier start on a tie),
        # so where the text is cut does not depend on how the tokens split it.
        hits = [(at + len(s), at) for s, at in ((s, self.text.find(s, start)) for s in self.stops) if at >= 0]
        if hits:
            self.text = self.text[: min(hits)[1]]
            self.stopped = True

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:k]):
                    best = k
                    break
        return best


def canvas_view(tokenizer: Tokenizer, canvas: Sequence[int], undecided: int, step: int,
                committed: Sequence[int], skip: int = 0) -> Canvas:
    """Each generated position's text (None while masked), for animating the denoising.

    Pieces are computed per run of decided tokens, so a multi-byte character is never glued
    across a masked gap; special tokens (EOS filling the tail) show as "". ``skip``: bytes cut from
    the decided run at the start (the prompt tail that token healing makes the answer re-spell).
    """
    tokens: list[str | None] = [None] * len(canvas)
    run_start = None
    for i in range(len(canvas) + 1):
        decided = i < len(canvas) and canvas[i] != undecided
        if decided and run_start is None:
            run_start = i
        elif not decided and run_start is not None:
            tokens[run_start:i] = tokenizer.pieces(canvas[run_start:i])
            run_start = None
    for i, piece in enumerate(tokens):
        if skip <= 0 or piece is None:
            break
        data = piece.encode("utf-8")
        tokens[i], skip = data[skip:].decode("utf-8", errors="replace"), max(skip - len(data), 0)
    masked = sum(1 for t in tokens if t is None)
    return Canvas(step=step, tokens=tokens, committed=list(committed), masked=masked)
