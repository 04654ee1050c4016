"""A request as a row of the engine's running batch.

The engine keeps one batch for its model, the same objects a ``generate`` or ``ar_generate``
call decodes with: a ``DiffusionBatch`` of ``Row``s, or an ``ARBatch`` of ``ARRow``s. A request
becomes a row here (checked as every decoding path checks its inputs) and is added to the batch
when admitted, so a request gives exactly what the solo call gives for the same seed.
"""

from __future__ import annotations

from torch import nn

from unmask.decoding.ar import ARBatch, ARRow
from unmask.decoding.canvas import check_inputs, end_ids, finish, row_generators
from unmask.decoding.config import GenerationConfig
from unmask.decoding.generate import forward_for
from unmask.decoding.healing import Healing
from unmask.decoding.step import DiffusionBatch, Row, make_row
from unmask.models.config import AttentionMode

Job = Row | ARRow
Batch = DiffusionBatch | ARBatch


BUCKET = 64  # canvas widths of the static-shape path are multiples of this


def make_batch(model: nn.Module, cache: str, cache_refresh: int | None, static: bool = False) -> Batch:
    """The running batch for ``model``: AR for causal models, diffusion (with the engine's cache) otherwise;
    ``static``: bucketed canvas widths and on-device selection where the rows allow it."""
    if model.config.attention == AttentionMode.CAUSAL:
        return ARBatch(model)
    forward = forward_for(model, GenerationConfig(cache=cache, cache_refresh=cache_refresh))
    return DiffusionBatch(model, forward, bucket=BUCKET if static else None, on_device=static)


def make_job(
    model: nn.Module,
    prompt: list[int],
    config: GenerationConfig,
    seed: int | None,
    suffix: list[int] | None = None,
    heal: Healing | None = None,
) -> Job:
    """The row for one request; raises ``UnmaskError`` for a request no decoding path could run."""
    suffixes = None if suffix is None else [suffix]
    check_inputs(model, [prompt], config, suffixes=suffixes, heal=None if heal is None else [heal])
    generator = row_generators(1, config, [seed])[0]
    if model.config.attention == AttentionMode.CAUSAL:
        return ARRow(list(prompt), config, generator, end_ids(model.config, config), heal)
    return make_row(model, prompt, config, generator, suffix=suffix or (), heal=heal)


def canvas(batch: Batch, job: Job) -> list[int]:
    """The job's region as it stands; the batch's undecided id marks open slots."""
    if isinstance(job, ARRow):
        return job.region(undecided(batch))
    return batch.region(job)  # type: ignore[union-attr]


def undecided(batch: Batch) -> int:
    return batch.undecided if isinstance(batch, ARBatch) else batch.mask_id


def outcome(batch: Batch, job: Job, model: nn.Module) -> tuple[list[int], str]:
    """The finished answer and why it ended (stop | length)."""
    (tokens,), (reason,) = finish([canvas(batch, job)], end_ids(model.config, job.config), job.config.stop_at_eos)
    return tokens, reason


def steps(job: Job) -> int:
    return len(job.out) if isinstance(job, ARRow) else job.steps
