"""Adapting an AR model into a diffusion model: what the shifted objectives read, and the trainer's init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import unmask
from unmask.decoding import GenerationConfig, decode
from unmask.diffusion.adapt import adapt_loss, complementary_views, predictions
from unmask.models.config import ModelConfig
from unmask.models.transformer import Transformer
from unmask.train.metrics import read_metrics
from unmask.train.trainer import freeze, run_training

from conftest import CODE, make_model_dir
from test_trainer import write_config

MASK = 1


def model_of(attention: str, block: int = 4, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                         attention=attention, block_size=block, shifted=True, mask_token_id=MASK)
    return Transformer(config).eval()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, 40, (3, 12), generator=gen), gen


def test_views_are_complementary():
    x0, gen = batch()
    views, rates, masked = complementary_views(x0, MASK, gen, 1e-3)
    assert torch.equal(masked[0], ~masked[1])
    assert torch.equal(views == MASK, masked)
    assert torch.allclose(rates.sum(0), torch.ones(3), atol=1e-3)


@torch.no_grad()
def test_block_predictions_are_what_decoding_with_the_exact_cache_reads():
    """Target i of view v, recomputed on its own: the clean blocks before its block, then the view's block."""
    model = model_of("block")
    x0, gen = batch(1)
    views, _, masked = complementary_views(x0, MASK, gen, 1e-3)
    target = masked.clone()
    target[:, :, 0] = False
    got = predictions(model, x0, views, target)
    k = 0
    for v, r, i in target.nonzero().tolist():
        start = i - i % 4
        if i == start:  # first of its block: read at the last clean token of the block before
            ref = model(x0[r : r + 1, :i])[0, i - 1]
        else:
            seq = torch.cat([x0[r, :start], views[v, r, start : start + 4]])[None]
            ref = model(seq)[0, i - 1]
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-4)
        k += 1
    assert k == got.shape[0] == int(target.sum())


@torch.no_grad()
def test_full_attention_predictions_open_from_causal_to_bidirectional():
    bidirectional = model_of("bidirectional")
    causal = Transformer(ModelConfig(**{**bidirectional.config.__dict__, "attention": "causal"}))
    causal.load_state_dict(bidirectional.state_dict())
    x0, gen = batch(2)
    views, _, masked = complementary_views(x0, MASK, gen, 1e-3)
    target = masked.clone()
    target[:, :, 0] = False
    for ratio, reference in ((1.0, bidirectional), (0.0, causal.eval())):
        got = predictions(bidirectional, x0, views, target, anneal=ratio)
        refs = [reference(views[v, r][None])[0, i - 1] for v, r, i in target.nonzero().tolist()]
        torch.testing.assert_close(got, torch.stack(refs), rtol=1e-4, atol=1e-4)


def test_distillation_pulls_toward_the_teacher_and_freezing_keeps_the_rest():
    student = model_of("block", seed=0)
    teacher = Transformer(ModelConfig(**{**model_of("block", seed=1).config.__dict__, "attention": "causal"})).eval()
    x0, _ = batch(3)
    trainable = freeze(student, "top:1")
    assert trainable == sum(p.numel() for n, p in student.named_parameters() if n.startswith("layers.1.") or n == "norm.weight")
    out = adapt_loss(student, x0, teacher=teacher, distill=1.0, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    for name, p in student.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    ce = adapt_loss(student, x0, generator=torch.Generator().manual_seed(0))
    assert not torch.isclose(out.loss, ce.loss)  # the KL term, not the cross-entropy
    assert torch.equal(out.nll_sum, ce.nll_sum)  # the reported bound is the same cross-entropy either way


def test_train_adapts_an_ar_model(tmp_path, tiny_tokenizer):
    base = make_model_dir(tmp_path / "base", tiny_tokenizer, attention="causal")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k, text in enumerate(CODE * 3):
        (corpus / f"f{k}.py").write_text(text)
    train = {"objective": "adapt", "init_from": str(base), "distill": 0.5, "trainable": "top:1", "steps": 6,
             "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "eval_every": 3, "eval_batches": 1, "ckpt_every": 3,
             "log_every": 1, "out_dir": "out"}
    config = write_config(tmp_path, {"model": {"block_size": 4}, "data": {"paths": [str(corpus)], "tokenizer": str(base),
                                                                         "seq_len": 16, "val_fraction": 0.3},
                                     "train": train})
    final = run_training(config, quiet=True)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7)) and "val_nll" in records[-1]
    loaded = unmask.load(final, device="cpu")
    c = loaded.model.config
    assert (c.attention, c.block_size, c.shifted, c.mask_token_id) == ("block", 4, True, tiny_tokenizer.mask_id)
    source = unmask.load(base, device="cpu").model.state_dict()
    after = loaded.model.state_dict()
    assert torch.equal(after["layers.0.attn.q_proj.weight"], source["layers.0.attn.q_proj.weight"])  # frozen
    assert not torch.equal(after["layers.1.attn.q_proj.weight"], source["layers.1.attn.q_proj.weight"])  # trained
    info = json.loads((final / "training.json").read_text())
    assert info["trainable_parameters"] < info["parameters"]
    ids = loaded.tokenizer.encode("def add(a, b):")
    out = decode(loaded.model, [ids], GenerationConfig(max_new_tokens=8, block_size=4, cache="prefix"))
    ref = decode(loaded.model, [ids], GenerationConfig(max_new_tokens=8, block_size=4))
    assert out.sequences == ref.sequences  # the exact block cache


def test_distillation_loss_is_finite_although_mask_is_impossible_for_both():
    """[MASK] has probability 0 under student and teacher alike: its KL term is 0, not 0 * inf."""
    model = model_of("bidirectional")
    x0, _ = batch(4)
    out = adapt_loss(model, x0, teacher=model, distill=1.0, anneal=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss)


def test_perplexity_scores_a_shifted_model_on_the_ar_twins_tokens():
    """The ELBO of an adapted (shifted) model covers exactly the tokens its AR base is scored on."""
    from unmask.eval.perplexity import make_windows, score

    model = model_of("block")
    base = Transformer(ModelConfig(**{**model.config.__dict__, "attention": "causal"})).eval()
    base.load_state_dict(model.state_dict())
    windows = make_windows(torch.randint(2, 40, (200,), generator=torch.Generator().manual_seed(0)).numpy(), 15)
    bound, exact = score(model, windows, samples=2, batch_size=4), score(base, windows)
    assert bound["kind"] == "upper bound (ELBO)" and exact["kind"] == "exact"
    assert bound["tokens_scored"] == exact["tokens_scored"]
    # Every masked target sees less than the AR context, so its ELBO is no better than the AR NLL here
    # (random weights: both near log(40)); a wrong normalisation (L instead of L - 1) or weight shows.
    assert bound["nll_per_token"] > 0.8 * exact["nll_per_token"]
