"""The token grid every decoding path works on, and what comes before and after the steps.

A canvas holds one row per sequence: left padding, the prompt (or infill prefix), the region
being written, the suffix (infill), right padding. Prompts are left-padded to one width, so
every row's region starts at the same column; regions may differ in length (engine rows are
separate requests). ``pad_batch`` lays rows out, ``check_inputs`` refuses what no path can
decode (one message per mistake, whichever path meets it first), ``finish`` trims the written
regions into answers. Nothing here runs a model except ``full_forward``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from unmask.errors import UnmaskError
from unmask.models.config import AttentionMode, ModelConfig

if TYPE_CHECKING:
    from unmask.decoding.config import GenerationConfig
    from unmask.decoding.healing import Healing


@dataclass
class Canvas:
    """Rows of tokens laid out by ``pad_batch``; ``region`` is the part being written."""

    ids: Tensor  # [B, T] left padding, prompt/prefix, generated region, suffix, right padding
    positions: Tensor  # [B, T] position of each token in its own unpadded sequence
    valid: Tensor | None  # [B, T] False on padding; None when there is none
    start: int  # column of every row's first region slot
    length: int  # N, the longest region
    lengths: tuple[int, ...] = ()  # each row's region length (empty: all N)

    def __post_init__(self) -> None:
        if not self.lengths:
            self.lengths = (self.length,) * self.ids.shape[0]

    @property
    def region(self) -> Tensor:
        """[B, N] view of the regions; a shorter row's slots past its own length hold its suffix."""
        return self.ids[:, self.start : self.start + self.length]

    def row_region(self, r: int) -> Tensor:
        return self.ids[r, self.start : self.start + self.lengths[r]]


# (canvas, rows or None for all rows, window, span) -> logits [rows, window, V]. ``window``: the source
# positions whose logits the step needs; ``span``: the canvas slots whose tokens may still change
# in the running blocks (from the earliest running block's first slot to the latest one's end),
# which is what a block cache must recompute.
LogitsFn = Callable[[Canvas, "Tensor | None", slice, slice], Tensor]


def full_forward(model: nn.Module) -> LogitsFn:
    """Recompute the whole canvas every step (no cache)."""

    def forward(canvas: Canvas, rows: Tensor | None, window: slice, span: slice) -> Tensor:
        ids, positions, valid = canvas.ids, canvas.positions, canvas.valid
        if rows is not None:
            ids, positions = ids[rows], positions[rows]
            valid = None if valid is None else valid[rows]
        return model(ids, positions, valid, logits_index=window)

    return forward


def pad_batch(
    left: Sequence[Sequence[int]],
    middle: int | Sequence[Sequence[int]],
    fill: int,
    right: Sequence[Sequence[int]],
    pad: int,
    device: torch.device,
    bucket: int | None = None,
) -> Canvas:
    """Left-pad ``left`` parts, then the middles (``middle`` slots of ``fill``, or each row's own
    tokens), then the right parts, right-padded to one width; ``bucket``: round that width up to a
    multiple (prompts of many lengths then share a few shapes)."""
    middles = [[fill] * middle for _ in left] if isinstance(middle, int) else [list(m) for m in middle]
    width_l = max(len(x) for x in left)
    tails = [len(m) + len(r) for m, r in zip(middles, right)]
    width = width_l + max(tails)
    if bucket:
        width = -(-width // bucket) * bucket
    ids, valid = [], []
    for lft, mid, rgt in zip(left, middles, right):
        pl = width_l - len(lft)
        pr = width - pl - len(lft) - len(mid) - len(rgt)
        ids.append([pad] * pl + list(lft) + mid + list(rgt) + [pad] * pr)
        valid.append([False] * pl + [True] * (len(lft) + len(mid) + len(rgt)) + [False] * pr)
    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
    valid_t = torch.tensor(valid, dtype=torch.bool, device=device)
    positions = (valid_t.long().cumsum(dim=1) - 1).clamp(min=0)
    lengths = tuple(len(m) for m in middles)
    return Canvas(ids_t, positions, None if bool(valid_t.all()) else valid_t, width_l, max(lengths), lengths)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device(getattr(model, "device", "cpu"))


def pad_id(model_config: ModelConfig) -> int:
    """The id that fills padding slots: pad, else EOS, else 0 (padding is never attended to)."""
    return next((i for i in (model_config.pad_token_id, model_config.eos_token_id) if i is not None), 0)


def end_ids(model_config: ModelConfig, config: GenerationConfig | None = None) -> list[int]:
    """Tokens that end a sequence: EOS, pad (which a model may use to close an infill), stop ids."""
    ids = {i for i in (model_config.eos_token_id, model_config.pad_token_id) if i is not None}
    return sorted(ids | set(config.stop_ids if config is not None else ()))


def stop_tensor(ends: list[int], config: GenerationConfig, device: torch.device) -> Tensor | None:
    """``ends`` on the device for early stopping, or None when there is nothing to stop at."""
    return torch.tensor(ends, dtype=torch.long, device=device) if config.stop_at_eos and ends else None


def row_generators(n: int, config: GenerationConfig, seeds: Sequence[int | None] | None) -> list[torch.Generator]:
    """One CPU generator per row, seeded with ``seeds[r]``, else ``config.seed``, else a fresh seed."""
    if seeds is not None and len(seeds) != n:
        raise UnmaskError(f"got {len(seeds)} seeds for {n} prompts")
    gens = []
    for r in range(n):
        seed = seeds[r] if seeds is not None else None
        seed = config.seed if seed is None else seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        gens.append(torch.Generator().manual_seed(int(seed)))
    return gens


def check_inputs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    suffixes: Sequence[Sequence[int]] | None = None,
    heal: Sequence[Healing | None] | None = None,
    what: str = "prompt",
) -> None:
    """Everything about a request that no decoding path can get past, checked once for all of them:
    the settings, the model's kind, non-empty prompts where the model reads the token before each
    prediction, ids inside the vocabulary, and each row's total length within ``max_seq_len``."""
    config.validate()
    mc = model.config
    ar = mc.attention == AttentionMode.CAUSAL
    if ar and not mc.shifted:
        raise UnmaskError("AR decoding needs a shifted model (logit i predicts token i + 1)")
    if not ar and mc.mask_token_id is None:
        raise UnmaskError("diffusion decoding needs a model with mask_token_id")
    if suffixes is not None:
        if len(suffixes) != len(prompts):
            raise UnmaskError(f"got {len(prompts)} prefixes but {len(suffixes)} suffixes")
        if any(suffixes) and mc.attention != AttentionMode.BIDIRECTIONAL:
            kind = "autoregressive" if ar else mc.attention
            raise UnmaskError(f"fill-in-the-middle needs a bidirectional model, this one is {kind}")
    if heal is not None and len(heal) != len(prompts):
        raise UnmaskError(f"got {len(heal)} token-healing constraints for {len(prompts)} prompts")
    if not prompts:
        raise UnmaskError(f"no {what}s given")
    if mc.shifted and any(len(p) == 0 for p in prompts):
        raise UnmaskError(
            f"this model needs a non-empty {what}: its first prediction comes from the token before it (at least a BOS token)"
        )
    for r, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise UnmaskError(f"{what} {r}: token id {bad[0]} outside the vocabulary of size {mc.vocab_size}")
        more = config.max_new_tokens + (len(suffixes[r]) if suffixes is not None else 0)
        if len(ids) + more > mc.max_seq_len:
            raise UnmaskError(
                f"{what} {r}: {len(ids)} tokens + {more} to write exceed the model's context of "
                f"{mc.max_seq_len} tokens (max_seq_len)"
            )


@dataclass
class StepEvent:
    """Sent to ``on_step`` after every step (live views, streaming)."""

    step: int  # 0-based index of the step just taken
    nfe: int  # model forward calls so far
    canvas: Tensor  # [B, N] generated region; ``mask_id`` where still undecided
    committed: Tensor  # [B, N] bool: positions this step wrote
    done: Tensor  # [B] bool: rows that need no more steps
    mask_id: int  # the id marking undecided positions in ``canvas``


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # generated ids per row, without trailing EOS/pad/mask
    finish_reasons: list[str]  # "stop" when EOS ended the row, else "length"
    nfe: int  # model forward calls (a batched call counts once)
    steps: list[int]  # steps (forward calls taken part in) per row
    tokens_per_forward: float  # generated tokens per forward call of a row (= tokens / nfe at batch 1)
    trace: list[Tensor] | None = None  # [B, N] canvas after every step when config.trace
    elapsed: float = 0.0  # wall-clock seconds


def finish(region: list[list[int]], ends: Sequence[int], stop_at_eos: bool) -> tuple[list[list[int]], list[str]]:
    """Trim each row: cut at the first end token (stop_at_eos) or drop trailing end tokens."""
    sequences, reasons = [], []
    for row in region:
        cut = next((i for i, t in enumerate(row) if t in ends), None) if stop_at_eos else None
        if cut is not None:
            sequences.append(row[:cut])
            reasons.append("stop")
            continue
        while row and row[-1] in ends:
            row = row[:-1]
        sequences.append(row)
        reasons.append("length")
    return sequences, reasons


def result(
    sequences: list[list[int]], reasons: list[str], nfe: int, steps: list[int], trace: list[Tensor] | None, started: float
) -> GenerationResult:
    """Bundle the outcome; TPF counts each row's tokens against the forward calls it took part in."""
    tpf = sum(len(s) for s in sequences) / max(sum(steps), 1)
    return GenerationResult(sequences, reasons, nfe, steps, tpf, trace, time.perf_counter() - started)
