"""One request's decoding state, advanced a step at a time so an engine can batch many of them.

A ``DiffusionJob`` owns its canvas (prompt + masked region + suffix) and says which slice of it
needs logits this step; the engine stacks the slices of all running jobs into one forward pass
and hands each job its rows back. An ``ARJob`` owns a per-token KV cache and runs its own
forward pass. Both reuse the row logic of ``unmask.decoding`` so that a job gives exactly what
``generate`` / ``ar_generate`` give for the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from unmask.decoding.generate import (
    GenerationConfig,
    candidates,
    check_prompts,
    commit,
    end_ids,
    finish,
    heal_slots,
    model_device,
    plan_rows,
    row_generators,
    select,
    stop_tensor,
)
from unmask.decoding.healing import UNDECIDED, Healing
from unmask.decoding.policies import make_policy
from unmask.decoding.sampling import predict
from unmask.errors import UnmaskError
from unmask.models.transformer import KVCache


class DiffusionJob:
    """Masked-diffusion decoding of one sequence (completion, or infill when a suffix is given)."""

    def __init__(
        self,
        model: nn.Module,
        prompt: list[int],
        config: GenerationConfig,
        seed: int | None,
        suffix: list[int] | None,
        heal: Healing | None = None,
    ) -> None:
        config.validate()
        mc = model.config
        if mc.mask_token_id is None:
            raise UnmaskError("diffusion decoding needs a model with mask_token_id")
        suffix = list(suffix or [])
        if suffix and mc.attention != "bidirectional":
            raise UnmaskError(f"fill-in-the-middle needs a bidirectional model, this one is {mc.attention}")
        n = config.max_new_tokens
        check_prompts(model, [prompt], [n + len(suffix)])
        if mc.shifted and not prompt:
            raise UnmaskError("a shifted model needs a non-empty prompt (the first prediction comes from the token before it)")
        self.config, self.mask_id, self.n = config, mc.mask_token_id, n
        self.row = plan_rows(model, [prompt], config, None if seed is None else [seed])[0]
        self.tokens = torch.tensor(prompt + [self.mask_id] * n + suffix, dtype=torch.long, device=model_device(model))
        self.start, self.shift = len(prompt), 1 if mc.shifted else 0
        self.aligned, self.block_size = mc.attention == "block", mc.block_size
        self.policy = make_policy(config)
        self.end_list = end_ids(mc, config)
        self.ends = stop_tensor(self.end_list, config, self.tokens.device)
        self._cands: Tensor | None = None
        self.heal = heal  # token healing: the first generated tokens must spell heal.removed

    @property
    def region(self) -> Tensor:
        return self.tokens[self.start : self.start + self.n]

    @property
    def done(self) -> bool:
        return self.row.done

    def window(self) -> tuple[int, int]:
        """[lo, hi) of the source positions whose logits the next step needs."""
        self._cands = candidates(self.region, self.row, self.mask_id)
        lo = self.start + int(self._cands[0])
        hi = self.start + self.row.blocks[self.row.block][1]
        return lo - self.shift, hi - self.shift

    def block_slot(self) -> int:
        """First slot of the current block in this job's own sequence (block-causal: aligned to the
        block grid, so it may lie inside the prompt); call after ``window()``."""
        slot = self.start + self.row.blocks[self.row.block][0]
        return slot - slot % self.block_size if self.aligned else slot

    def advance(self, logits: Tensor) -> list[int]:
        """Commit this step's picks from ``logits`` [1, hi - lo, V] of ``window()``; returns the region indices written."""
        cands, self._cands = self._cands, None
        assert cands is not None, "window() must come before advance()"
        lo = self.start + int(cands[0])
        plan = self.row.plan(cands.numel())
        heals, regions = (None, None) if self.heal is None else ([self.heal], self.region[None])
        (pos, tokens), = select(
            self.policy, logits, self.start - lo, [cands], [plan], [self.row.generator], self.config, self.mask_id,
            heals, regions,
        )
        written = commit(self.row, self.region, pos, tokens, self.ends, self.mask_id)
        return written.nonzero().flatten().tolist()

    @property
    def steps(self) -> int:
        return self.row.steps

    def canvas(self) -> list[int]:
        return self.region.tolist()

    def outcome(self) -> tuple[list[int], str]:
        (tokens,), (reason,) = finish([self.region.tolist()], self.end_list, self.config.stop_at_eos)
        return tokens, reason


class ARJob:
    """Autoregressive decoding of one sequence with its own per-token KV cache."""

    def __init__(
        self, model: nn.Module, prompt: list[int], config: GenerationConfig, seed: int | None, heal: Healing | None = None
    ) -> None:
        config.validate()
        mc = model.config
        if not mc.shifted:
            raise UnmaskError("AR decoding needs a shifted model (logit i predicts token i + 1)")
        if not prompt:
            raise UnmaskError("AR decoding needs a non-empty prompt (at least a BOS token)")
        n = config.max_new_tokens
        check_prompts(model, [prompt], [n])
        self.model, self.config, self.n = model, config, n
        self.mask_id = mc.mask_token_id if mc.mask_token_id is not None else -1
        self.generator = row_generators(1, config, None if seed is None else [seed])[0]
        device = model_device(model)
        self.cache = KVCache.allocate(mc, 1, len(prompt) + n, dtype=next(model.parameters()).dtype, device=device)
        self.feed = torch.tensor([prompt], dtype=torch.long, device=device)
        self.position = len(prompt)
        self.out: list[int] = []
        self.end_list = end_ids(mc, config)
        self.done = False
        self.heal = heal  # token healing: the first generated tokens must spell heal.removed

    @property
    def steps(self) -> int:
        return len(self.out)

    def step(self) -> list[int]:
        """Run the model once and append one token; returns the region index written."""
        width = self.feed.shape[1]
        positions = torch.arange(self.position - width, self.position, device=self.feed.device)[None]
        valid = torch.ones_like(self.feed, dtype=torch.bool)
        logits = self.model(self.feed, positions, valid, cache=self.cache, logits_index=slice(width - 1, width))[:, 0]
        slots = None
        if self.heal is not None:
            region = torch.tensor([self.out + [UNDECIDED] * (self.n - len(self.out))])
            slots = heal_slots([self.heal], region, [torch.tensor([len(self.out)])], UNDECIDED)
        pred = predict(
            logits,
            [1],
            [self.generator],
            temperature=self.config.temperature,
            top_k=self.config.top_k,
            top_p=self.config.top_p,
            mask_id=self.model.config.mask_token_id,
            healing=slots,
        )
        token = int(pred.tokens[0])
        self.out.append(token)
        self.feed = pred.tokens.view(1, 1)
        self.position += 1
        ended = self.config.stop_at_eos and token in self.end_list
        self.done = ended or len(self.out) == self.n
        return [len(self.out) - 1]

    def canvas(self) -> list[int]:
        last = self.out[-1] if self.out else self.mask_id
        ended = self.config.stop_at_eos and last in self.end_list
        return self.out + [last if ended else self.mask_id] * (self.n - len(self.out))

    def outcome(self) -> tuple[list[int], str]:
        (tokens,), (reason,) = finish([self.canvas()], self.end_list, self.config.stop_at_eos)
        return tokens, reason
