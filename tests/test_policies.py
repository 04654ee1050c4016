"""Commit policies and the sampler, on hand-made distributions."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest, chisquare

from unmask.decoding import GenerationConfig
from unmask.decoding.policies import POLICIES, StepPlan, make_policy, top_n
from unmask.decoding.sampling import Predictions, filter_logits, predict


def preds(probs: list[list[float]], tokens: list[int] | None = None) -> Predictions:
    p = torch.tensor(probs, dtype=torch.float32)
    tok = p.argmax(-1) if tokens is None else torch.tensor(tokens)
    return Predictions(tok, p.log())


def chosen(policy_name: str, pred: Predictions | None, plan: StepPlan, **kw) -> list[int]:
    policy = make_policy(GenerationConfig(policy=policy_name, **kw))
    scores = policy.score(pred) if policy.uses_predictions else None
    return policy.select(scores, plan, torch.Generator().manual_seed(0)).nonzero().flatten().tolist()


def plan(masked: int, quota: int = 1, steps_left: int | None = None) -> StepPlan:
    return StepPlan(masked=masked, quota=quota, steps_left=masked if steps_left is None else steps_left)


def test_scores_by_hand():
    pred = preds([[0.5, 0.5, 0.0], [0.6, 0.2, 0.2]])
    assert pred.confidence.tolist() == pytest.approx([0.5, 0.6])
    assert pred.margin.tolist() == pytest.approx([0.0, 0.4])
    h1 = -(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2))
    assert pred.neg_entropy.tolist() == pytest.approx([-math.log(2), -h1])


def test_confidence_margin_entropy_rank_differently():
    # X: confidence 0.50, margin 0.05; Y: confidence 0.48, margin 0.22.
    xy = preds([[0.50, 0.45, 0.05], [0.48, 0.26, 0.26]])
    assert chosen("confidence", xy, plan(2)) == [0]
    assert chosen("margin", xy, plan(2)) == [1]
    # A: entropy log 2 = 0.69, confidence 0.5; B: entropy 0.95, confidence 0.6, margin 0.4.
    ab = preds([[0.5, 0.5, 0.0], [0.6, 0.2, 0.2]])
    assert chosen("entropy", ab, plan(2)) == [0]
    assert chosen("confidence", ab, plan(2)) == [1] and chosen("margin", ab, plan(2)) == [1]


def test_confidence_uses_the_chosen_token_and_the_quota():
    pred = preds([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]], tokens=[1, 1, 0, 1])  # confidences .1 .7 .6 .8
    assert chosen("confidence", pred, plan(4, quota=2)) == [1, 3]
    assert chosen("confidence", pred, plan(4, quota=3)) == [1, 2, 3]


def test_threshold_counts():
    pred = preds([[0.95, 0.05], [0.5, 0.5], [0.92, 0.08], [0.91, 0.09]])
    assert chosen("threshold", pred, plan(4), threshold=0.9) == [0, 2, 3]
    assert chosen("threshold", pred, plan(4), threshold=0.99) == [0]  # always the best one
    assert chosen("threshold", pred, plan(4), threshold=0.0) == [0, 1, 2, 3]
    assert len(chosen("threshold", pred, plan(4, steps_left=2), threshold=0.99)) == 2  # step cap


def factor_rule(conf: list[float], f: float) -> int:
    c = sorted(conf, reverse=True)
    return max([n for n in range(1, len(c) + 1) if (n + 1) * (1 - c[n - 1]) < f] + [1])


@pytest.mark.parametrize(
    "conf,f,n",
    [
        ([0.6, 0.99, 0.7, 0.95], 1.0, 2),  # 2*.01, 3*.05 < 1; 4*.3 and 5*.4 are not
        ([0.9, 0.85, 0.84, 0.83], 1.0, 4),
        ([0.9, 0.85, 0.84, 0.83], 0.5, 2),
        ([0.3, 0.2], 1.0, 1),  # nothing qualifies: still one
        ([0.97, 0.99, 0.98], 0.2, 3),
    ],
)
def test_factor_counts(conf, f, n):
    assert factor_rule(conf, f) == n
    pred = preds([[c, 1 - c] for c in conf], tokens=[0] * len(conf))
    picked = chosen("factor", pred, plan(len(conf)), factor=f)
    assert sorted(picked) == sorted(sorted(range(len(conf)), key=lambda i: -conf[i])[:n])


def test_factor_matches_its_rule_on_random_vectors():
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        conf = (0.5 + 0.5 * torch.rand(int(torch.randint(1, 9, (), generator=g)), generator=g)).tolist()
        f = float(torch.rand((), generator=g)) * 2 + 0.05
        pred = preds([[c, 1 - c] for c in conf], tokens=[0] * len(conf))
        assert len(chosen("factor", pred, plan(len(conf)), factor=f)) == factor_rule(conf, f)


def test_top_n_breaks_ties_by_position():
    assert top_n(torch.tensor([0.5, 0.9, 0.9, 0.1]), 1).nonzero().flatten().tolist() == [1]
    assert top_n(torch.tensor([0.2, 0.2, 0.2]), 2).tolist() == [True, True, False]


def test_random_reveals_with_probability_one_over_steps_left():
    policy = make_policy(GenerationConfig(policy="random", steps=8))
    g = torch.Generator().manual_seed(1)
    revealed = torch.zeros(5)
    trials = 2000
    for _ in range(trials):
        revealed += policy.select(None, StepPlan(masked=5, quota=1, steps_left=4), g).double()
    for count in revealed.tolist():
        assert binomtest(int(count), trials, 0.25).pvalue > 1e-3
    assert binomtest(int(revealed.sum()), 5 * trials, 0.3).pvalue < 1e-6  # the test can tell 1/4 from 0.3
    assert policy.select(None, StepPlan(masked=5, quota=1, steps_left=1), g).all()


@pytest.mark.parametrize("name,quota", [("random", 1), ("random_count", 2)])
def test_random_positions_are_uniform(name, quota):
    policy = make_policy(GenerationConfig(policy=name))  # steps None: one per step for `random`
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(4)
    for _ in range(2000):
        picked = policy.select(None, StepPlan(masked=4, quota=quota, steps_left=4), g)
        assert int(picked.sum()) == quota
        counts += picked.double()
    assert chisquare(counts.numpy()).pvalue > 1e-3


def test_every_policy_is_registered_and_builds_from_a_config():
    for name, cls in POLICIES.items():
        policy = make_policy(GenerationConfig(policy=name))
        assert type(policy) is cls and policy.name == name


# ---------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    kept = torch.isfinite(filter_logits(logits, temperature=0.0, top_k=2))
    assert kept.tolist() == [[True, False, False, False, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept_75 = torch.isfinite(filter_logits(probs.log(), temperature=1.0, top_p=0.75))
    kept_85 = torch.isfinite(filter_logits(probs.log(), temperature=1.0, top_p=0.85))
    assert kept_75.tolist() == [[True, True, False, False]] and kept_85.tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(probs.log(), temperature=1.0, mask_id=0)).tolist() == [[False, True, True, True]]


def test_gumbel_max_samples_the_filtered_tempered_softmax():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, 0.2])
    mask_id, temperature, n = 4, 0.7, 6000
    expected = torch.softmax(filter_logits(logits[None], temperature=temperature, top_k=4, mask_id=mask_id), -1)[0]
    pred = predict(logits.expand(n, -1), [n], [torch.Generator().manual_seed(0)], temperature=temperature, top_k=4, mask_id=mask_id)
    counts = torch.bincount(pred.tokens, minlength=6).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # neither [MASK] nor the filtered token
    assert torch.allclose(pred.confidence, expected[pred.tokens])
    wrong = torch.softmax(logits.masked_fill(~support, float("-inf")), -1)  # forgot the temperature
    assert pvalue(counts[support], expected[support]) > 1e-3
    assert pvalue(counts[support], wrong[support]) < 1e-6


def pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    probs = probs.double() / probs.double().sum()
    return float(chisquare(counts.numpy(), (probs * counts.sum()).numpy()).pvalue)


def test_each_row_draws_from_its_own_generator():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(4))
    kw = dict(temperature=1.0, top_p=0.95)
    together = predict(logits, [2, 3], [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], **kw)
    first = predict(logits[:2], [2], [torch.Generator().manual_seed(1)], **kw)
    second = predict(logits[2:], [3], [torch.Generator().manual_seed(2)], **kw)
    assert together.tokens.tolist() == first.tokens.tolist() + second.tokens.tolist()
