"""Settled-prefix text streaming: deltas always add up to the final text, whatever the reveal order."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from unmask.serve.text import TextTracker, canvas_view

MASK = -1
# Multi-byte characters split across byte-level tokens, code, and stop-string material.
ALPHABET = "ab c\n:()=é€😀日本"


def reference(tokenizer, ids: list[int], ends: set[int], stops: list[str]) -> str:
    """Text of ``ids`` up to the first end token, cut before the stop string that is complete first
    when the text is read character by character (the earlier start on a tie)."""
    cut = next((k for k, t in enumerate(ids) if t in ends), len(ids))
    text = tokenizer.decode(ids[:cut])
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s and text.find(s) >= 0]
    return text[: min(hits)[1]] if hits else text


def reveal(ids: list[int], rng: random.Random, per_step: int) -> list[list[int]]:
    """Canvases after each step of a random-order reveal of ``ids``."""
    order = list(range(len(ids)))
    rng.shuffle(order)
    canvas, frames = [MASK] * len(ids), []
    for k in range(0, len(order), per_step):
        for i in order[k : k + per_step]:
            canvas[i] = ids[i]
        frames.append(list(canvas))
    return frames


@settings(max_examples=150, deadline=None)
@given(
    text=st.text(alphabet=ALPHABET, max_size=40),
    stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=3), max_size=3),
    seed=st.integers(0, 2**16),
    per_step=st.integers(1, 4),
    raw_bytes=st.lists(st.integers(0, 255), max_size=4),
    end_at=st.one_of(st.none(), st.integers(0, 30)),
)
def test_deltas_add_up_to_the_final_text(tiny_tokenizer, text, stops, seed, per_step, raw_bytes, end_at):
    tok = tiny_tokenizer
    ids = tok.encode(text)
    single = {tok.token_bytes(i): i for i in range(tok.vocab_size) if i not in tok.special_ids}
    ids += [single[bytes([b])] for b in raw_bytes]  # possibly invalid or cut-off UTF-8
    if end_at is not None and end_at < len(ids):
        ids.insert(end_at, tok.eos_id)  # an end token: nothing after it counts
    ends = {tok.eos_id}
    tracker, sent = TextTracker(tok, ends, stops), []
    rng = random.Random(seed)
    for canvas in reveal(ids, rng, per_step):
        tracker.advance(canvas, MASK)
        sent.append(tracker.delta())
        so_far = "".join(sent)
        assert not any(s in so_far for s in stops), "a stop string was sent"
    tracker.finish(ids[: next((k for k, t in enumerate(ids) if t in ends), len(ids))])
    sent.append(tracker.delta(final=True))
    assert "".join(sent) == tracker.text == reference(tok, ids, ends, stops)


def test_partial_character_is_held_back(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("😀")
    assert len(ids) > 1  # a 4-byte character split over byte tokens
    tracker = TextTracker(tok, set(), [])
    tracker.advance(ids[:-1] + [MASK], MASK)
    assert tracker.delta() == ""
    tracker.advance(ids, MASK)
    assert tracker.delta() == "😀"


def test_possible_stop_prefix_is_held_back_until_it_cannot_be_one(tiny_tokenizer):
    tok = tiny_tokenizer
    tracker = TextTracker(tok, set(), ["\nclass"])
    tracker.advance(tok.encode("x = 1\ncl"), MASK)
    assert tracker.delta() == "x = 1"
    tracker.advance(tok.encode("x = 1\nclose()"), MASK)
    assert tracker.delta() == "\nclose()"


def test_canvas_view_pieces_join_to_the_text(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("def f(é):\n    return 1\n") + [tok.eos_id, tok.eos_id]
    partial = [t if k % 3 else MASK for k, t in enumerate(ids)]
    view = canvas_view(tok, partial, MASK, step=2, committed=[1])
    assert view.masked == sum(1 for t in partial if t == MASK)
    assert [t is None for t in view.tokens] == [t == MASK for t in partial]
    full = canvas_view(tok, ids, MASK, step=3, committed=[0])
    assert full.masked == 0 and "".join(full.tokens) == tok.decode(ids)


def test_the_stop_complete_first_wins_whatever_the_token_split(tiny_tokenizer):
    tok = tiny_tokenizer
    word = next(w for w in ("return", "def", "self") if len(tok.encode(w)) == 1)  # one multi-character token
    text = "x" + word
    stops = [word[0], text]  # word[0] is complete at character 2, the whole text only at its end
    for ids in (tok.encode("x") + tok.encode(word), [i for ch in text for i in tok.encode(ch)]):
        tracker = TextTracker(tok, set(), stops)
        tracker.finish(ids)
        assert tracker.text == "x" and tracker.stopped, ids
