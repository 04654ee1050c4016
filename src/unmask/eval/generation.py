"""Batched completions and infills for the evaluations, with the figures a run is judged by.

Every item gets its own seed (``config.seed`` + its index), and decoding is batch invariant, so
an item's output does not depend on the batch it ran in. With token healing (the default) each
prompt is backed up to a token boundary its tokenizer keeps and the output must spell the removed
text first; the texts returned continue the prompts as given (``unmask.decoding.healing``). Items are sorted by length before
batching to waste less padding. Prompts longer than the model's context are cut from the left
(infill suffixes from the right) and counted.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from unmask.decoding import GenerationConfig, Healing, completion_text, decode, heal, infill
from unmask.errors import UnmaskError
from unmask.loading import LoadedModel
from unmask.models.config import AttentionMode

Progress = Callable[[int], None]  # called with the number of items just finished


@dataclass
class Outputs:
    """Generated texts and what producing them cost."""

    texts: list[str]  # decoded output per item (without trailing EOS/pad)
    finish_reasons: list[str]  # "stop" (the model ended it) or "length" per item
    truncated: int = 0  # items whose prompt (or suffix) was cut to fit the context
    nfe: int = 0  # forward calls, summed over batches
    row_steps: int = 0  # forward calls each item took part in, summed over items
    tokens: int = 0  # generated tokens, summed over items
    seconds: float = 0.0  # wall-clock decoding time
    mode: str = ""  # "diffusion", "ar", or for infills "fill-in-the-middle" / "prefix-only"
    notes: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, float | int | str]:
        return {
            "mode": self.mode,
            "forward_calls": self.nfe,
            "generated_tokens": self.tokens,
            "tokens_per_forward": round(self.tokens / max(self.row_steps, 1), 3),
            "seconds": round(self.seconds, 2),
            "tokens_per_second": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "truncated_prompts": self.truncated,
        }


def fit_prompt(ids: list[int], room: int) -> tuple[list[int], bool]:
    """The last ``room`` tokens of a prompt, and whether any were cut."""
    if room < 1:
        raise UnmaskError(f"no room for a prompt: the canvas fills the model's context ({room} tokens left)")
    return (ids[-room:], True) if len(ids) > room else (ids, False)


def fit_sides(prefix: list[int], suffix: list[int], room: int) -> tuple[list[int], list[int], bool]:
    """Prefix cut from the left and suffix from the right so that both fit in ``room`` tokens."""
    if room < 1:
        raise UnmaskError(f"no room for a prefix: the canvas fills the model's context ({room} tokens left)")
    if len(prefix) + len(suffix) <= room:
        return prefix, suffix, False
    keep_suffix = min(len(suffix), max(room - len(prefix), room // 2))
    keep_prefix = min(len(prefix), room - keep_suffix)
    return prefix[len(prefix) - keep_prefix :], suffix[:keep_suffix], True


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _run(
    loaded: LoadedModel,
    jobs: Sequence[tuple[list[int], list[int] | None, int, Healing | None]],
    config: GenerationConfig,
    batch_size: int,
    progress: Progress | None,
    tokens_per_step: int | None = None,
) -> Outputs:
    """Decode ``(prompt_ids, suffix_ids or None, canvas_length, healing)`` jobs; same canvas length per batch.

    ``tokens_per_step``: each canvas of length n gets ``ceil(n / tokens_per_step)`` steps
    (instead of ``config.steps``), so canvases of different lengths decode at the same pace.
    """
    model, tok = loaded.model, loaded.tokenizer
    texts: list[str] = [""] * len(jobs)
    reasons: list[str] = [""] * len(jobs)
    out = Outputs(texts, reasons)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, (_, suffix, n, _) in enumerate(jobs):
        groups.setdefault((n, suffix is None), []).append(i)
    started = time.perf_counter()
    for (n, plain), members in sorted(groups.items()):
        members.sort(key=lambda i: (len(jobs[i][0]) + len(jobs[i][1] or []), i))
        cfg = dataclasses.replace(config, max_new_tokens=n)
        if tokens_per_step is not None:
            cfg = dataclasses.replace(cfg, steps=math.ceil(n / tokens_per_step))
        for batch in _batches(members, batch_size):
            seeds = [(config.seed or 0) + i for i in batch]
            heals = [jobs[i][3] for i in batch]
            heals_or_none = heals if any(h is not None for h in heals) else None
            if plain:
                result = decode(model, [jobs[i][0] for i in batch], cfg, seeds=seeds, heal=heals_or_none)
            else:
                suffixes = [jobs[i][1] for i in batch]
                result = infill(model, [jobs[i][0] for i in batch], suffixes, cfg, seeds=seeds, heal=heals_or_none)
            for i, seq, why, h in zip(batch, result.sequences, result.finish_reasons, heals):
                texts[i] = completion_text(tok, seq, h)
                reasons[i] = why
                out.tokens += len(seq)
            out.nfe += result.nfe
            out.row_steps += sum(result.steps)
            if progress is not None:
                progress(len(batch))
    out.seconds = time.perf_counter() - started
    return out


def complete(
    loaded: LoadedModel,
    prompts: Sequence[str],
    config: GenerationConfig,
    batch_size: int = 8,
    progress: Progress | None = None,
    token_healing: bool = True,
) -> Outputs:
    """Continue each prompt by ``config.max_new_tokens`` tokens (AR for causal models, diffusion otherwise)."""
    tok, mc = loaded.tokenizer, loaded.model.config
    room = mc.max_seq_len - config.max_new_tokens
    jobs, cut = [], 0
    for text in prompts:
        ids, was_cut = fit_prompt(tok.encode(text), room)
        cut += was_cut
        if not ids:
            raise UnmaskError("an evaluation prompt encodes to no tokens")
        healed = heal(tok, ids, token_healing)
        jobs.append((healed.ids, None, config.max_new_tokens, healed.heal))
    out = _run(loaded, jobs, config, batch_size, progress)
    out.truncated = cut
    out.mode = "ar" if mc.attention == AttentionMode.CAUSAL else "diffusion"
    return out


def fill(
    loaded: LoadedModel,
    prefixes: Sequence[str],
    suffixes: Sequence[str],
    lengths: Sequence[int],
    config: GenerationConfig,
    batch_size: int = 8,
    progress: Progress | None = None,
    tokens_per_step: int | None = None,
    token_healing: bool = True,
) -> Outputs:
    """Write a middle of ``lengths[i]`` tokens between each prefix and suffix (the prefix healed).

    Bidirectional models fill in the middle (they see the suffix). Causal and block-causal models
    cannot, so they continue the prefix alone with the same token budget ("prefix-only").
    """
    tok, mc = loaded.tokenizer, loaded.model.config
    both = mc.attention == AttentionMode.BIDIRECTIONAL
    jobs, cut = [], 0
    for prefix, suffix, n in zip(prefixes, suffixes, lengths):
        room = mc.max_seq_len - n
        if both:
            left, right, was_cut = fit_sides(tok.encode(prefix), tok.encode(suffix), room)
        else:
            (left, was_cut), right = fit_prompt(tok.encode(prefix), room), None
        healed = heal(tok, left, token_healing)
        jobs.append((healed.ids, right, n, healed.heal))
        cut += was_cut
    out = _run(loaded, jobs, config, batch_size, progress, tokens_per_step)
    out.truncated = cut
    out.mode = "fill-in-the-middle" if both else "prefix-only"
    return out
