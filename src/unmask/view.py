"""The terminal live view: a canvas of [MASK] placeholders resolving into text, step by step."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.live import Live
from rich.text import Text

from unmask.tokenizer import Tokenizer

MASK_GLYPH = "░"
MASK_STYLE = "grey42"
FRESH_STYLE = "bold green"


def render_canvas(
    tokenizer: Tokenizer, ids: Sequence[int], mask_id: int, fresh: Sequence[bool] | None = None
) -> Text:
    """One glyph per masked position; decoded text elsewhere, tokens committed this step highlighted.

    Runs of decided tokens are decoded together, so characters split across byte-level tokens
    render whole.
    """
    text = Text()
    run: list[int] = []
    run_fresh: list[bool] = []

    def flush() -> None:
        for piece, is_fresh in zip(tokenizer.pieces(run), run_fresh):
            text.append(piece, style=FRESH_STYLE if is_fresh else None)
        run.clear()
        run_fresh.clear()

    for i, token in enumerate(ids):
        if token == mask_id:
            flush()
            text.append(MASK_GLYPH, style=MASK_STYLE)
        else:
            run.append(int(token))
            run_fresh.append(bool(fresh[i]) if fresh is not None else False)
    flush()
    return text


class LiveCanvas:
    """Redraws a prompt and its canvas in place on a console (stderr), one frame per step."""

    def __init__(self, tokenizer: Tokenizer, mask_id: int, prompt: str = "", console: Console | None = None) -> None:
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.prompt = prompt
        self.console = console or Console(stderr=True)
        self.live = Live(console=self.console, auto_refresh=False, transient=True)

    def __enter__(self) -> "LiveCanvas":
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(*exc)

    def frame(self, ids: Sequence[int], fresh: Sequence[bool] | None, caption: str) -> None:
        body = Text(self.prompt, style="bold")
        body.append_text(render_canvas(self.tokenizer, ids, self.mask_id, fresh))
        body.append(f"\n\n{caption}", style="dim")
        self.live.update(body, refresh=True)
