"""Perplexity on held-out tokens: an ELBO bound for diffusion models, the exact figure for AR models.

Both go through the trainer's validation (``unmask.train.trainer.evaluate``), so ``unmask eval
ppl`` and the numbers logged during training are the same computation:

- diffusion (bidirectional) and block-diffusion models: the masked-diffusion ELBO with a fixed
  quadrature of the diffusion time (window j of n gets the midpoint of cell j of [eps, 1]) and
  fixed masking noise. Each window is scored ``samples`` times (copy k of window j takes cell
  k * n + j), which tightens the Monte Carlo estimate of the expectation; the estimate is of an
  *upper bound* on the negative log-likelihood, so exp(bound) >= the model's true perplexity.
- causal models: next-token cross-entropy, exact.

Windows are non-overlapping stretches of ``seq_len`` tokens of the held-out stream. An AR
model is given each window with the one token before it, so that both kinds of model are
scored on exactly the same ``seq_len`` tokens per window; the AR model thereby conditions on
one token the diffusion model does not see, which can only favour the AR figure.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from unmask.errors import UnmaskError
from unmask.eval.report import Report, environment, model_facts
from unmask.loading import LoadedModel
from unmask.models.config import AttentionMode
from unmask.models.transformer import Transformer

OBJECTIVES = {AttentionMode.BIDIRECTIONAL: "diffusion", AttentionMode.BLOCK: "block", AttentionMode.CAUSAL: "ar"}


def objective_for(model: Transformer) -> str:
    """The objective whose validation figure this model gets: diffusion, block, adapt (shifted
    diffusion models: Dream-style, or adapted from an AR model) or ar."""
    cfg = model.config
    objective = OBJECTIVES[cfg.attention]
    if objective == "ar" and not cfg.shifted:
        raise UnmaskError("a causal model must have shifted logits (logit i predicts token i + 1) to be scored")
    if objective != "ar":
        if cfg.shifted:
            objective = "adapt"
        if cfg.mask_token_id is None:
            raise UnmaskError("a diffusion model needs mask_token_id to be scored")
    return objective


def check_same_tokenizer(models: list[LoadedModel]) -> None:
    """Per-token figures compare only between models that cut text into the same tokens."""
    first = models[0]
    for other in models[1:]:  # the same text -> ids mapping (an adapted model may add a [MASK] id)
        if other.tokenizer.backend.to_str() != first.tokenizer.backend.to_str():
            raise UnmaskError(f"{other.path} and {first.path} use different tokenizers; their per-token perplexities do not compare")


def make_windows(tokens: np.ndarray, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens, each with the token before it: [n, seq_len + 1].

    ``limit`` keeps that many windows, evenly spaced over the stream.
    """
    n = (int(tokens.size) - 1) // seq_len
    if n < 1:
        raise UnmaskError(f"the held-out data has {tokens.size} tokens, fewer than one window of {seq_len} (+1)")
    index = np.arange(n)
    if limit is not None and limit < n:
        index = np.unique(np.linspace(0, n - 1, num=limit).round().astype(np.int64))
    starts = 1 + index * seq_len
    rows = np.asarray(tokens)[(starts - 1)[:, None] + np.arange(seq_len + 1)[None, :]]
    return torch.from_numpy(rows.astype(np.int64))


def score(model: Transformer, windows: torch.Tensor, samples: int = 4, batch_size: int = 16) -> dict[str, Any]:
    """Per-token NLL of the windows' last ``seq_len`` tokens under ``model`` (bound or exact)."""
    from unmask.train.trainer import evaluate

    objective = objective_for(model)
    seq_len = windows.shape[1] - 1
    if seq_len > model.config.max_seq_len:
        raise UnmaskError(f"seq_len {seq_len} exceeds the model's context of {model.config.max_seq_len}")
    device = next(model.parameters()).device
    if device.type == "cuda":
        autocast: Any = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    if objective == "ar":
        x, draws = windows, 1
    elif objective == "adapt":  # shifted: the token before the window is the first one's context, as for AR
        x, draws = windows.repeat(samples, 1), samples
    else:
        x, draws = windows[:, 1:].repeat(samples, 1), samples
    nll = evaluate(model, objective, x, batch_size, autocast)["val_nll"]
    return {
        "objective": objective,
        "kind": "exact" if objective == "ar" else "upper bound (ELBO)",
        "nll_per_token": nll,
        "perplexity": math.exp(min(nll, 700.0)),
        "windows": int(windows.shape[0]),
        "seq_len": seq_len,
        "tokens_scored": int(windows.shape[0]) * seq_len,
        "time_samples_per_window": draws,
    }


def evaluate_models(
    models: list[LoadedModel],
    tokens: np.ndarray,
    source: str,
    *,
    seq_len: int | None = None,
    limit: int | None = None,
    samples: int = 4,
    batch_size: int = 16,
) -> Report:
    """Score every model on the same held-out windows; with a diffusion and an AR model, their ratio."""
    contexts = [m.model.config.max_seq_len for m in models]
    seq_len = seq_len or min(contexts)
    vocab = min(m.model.config.vocab_size for m in models)
    if tokens.size and int(tokens.max()) >= vocab:
        raise UnmaskError(f"the held-out tokens hold id {int(tokens.max())}, outside the vocabulary of {vocab}")
    windows = make_windows(tokens, seq_len, limit)
    results = []
    for m in models:
        out = score(m.model, windows, samples, batch_size)
        results.append({"model": model_facts(m), **out})
    rows = [
        [m.path.name, r["objective"], r["kind"], r["nll_per_token"], r["perplexity"], r["windows"], r["tokens_scored"]]
        for m, r in zip(models, results)
    ]
    notes = [f"held-out data: {source}; {windows.shape[0]} windows of {seq_len} tokens."]
    data: dict[str, Any] = {"metric": "perplexity", "data": source, "seq_len": seq_len, "models": results}
    bounds = [r for r in results if r["objective"] != "ar"]
    exact = [r for r in results if r["objective"] == "ar"]
    if any(r["objective"] in ("diffusion", "block") for r in bounds):
        notes.append(
            f"diffusion: exp of the ELBO, an upper bound on the true perplexity, estimated with {samples} fixed "
            "diffusion times per window (a quadrature over [eps, 1]) and fixed masking noise."
        )
    if any(r["objective"] == "adapt" for r in bounds):
        notes.append(
            f"shifted diffusion (adapt): exp of the ELBO over {samples} seeded draws per window of a mask rate and its "
            "complementary view (every token a target once per draw), an upper bound on the true perplexity."
        )
    if exact:
        notes.append("AR: exact perplexity; each window is given the one token before it, so both score the same tokens.")
    if bounds and exact:
        ratio = bounds[0]["perplexity"] / exact[0]["perplexity"]
        data["ratio_bound_to_ar"] = ratio
        notes.append(f"ratio (diffusion bound / AR exact): {ratio:.3f}")
    data["environment"] = environment(models[0])
    return Report("Held-out perplexity", ["model", "objective", "figure", "NLL/token (nats)", "perplexity", "windows", "tokens"], rows, notes, data)
