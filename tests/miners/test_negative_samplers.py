"""Negative samplers: SimANS's sampling distribution against Eq. 2 (chi-square), the positive-aware filters
against ``filter_candidates`` and their written conditions, the uniform draw of the static recipe, determinism."""

import numpy as np
import pytest
import torch

from miners.mine_hard_negatives import filter_candidates
from miners.negative_samplers import PositiveAwareFilter, SimANSSampler, TopKSampler, UniformSampler
from tests.helpers import oracle

ROWS = np.array([40, 7, 13, 2, 99, 5, 61, 30], dtype=np.int64)
SCORES = np.array([0.92, 0.85, 0.81, 0.77, 0.70, 0.64, 0.55, 0.41], dtype=np.float32)
POS = 0.8


def rng(epoch, row=3, seed=11):
    return np.random.default_rng([seed, epoch, row])


def eq2(scores, pos, a, b):
    """SimANS Eq. 2 written out: p_i = exp(-a (s_i - s_pos - b)^2) / sum_j exp(-a (s_j - s_pos - b)^2)."""
    w = [np.exp(-a * (float(s) - pos - b) ** 2) for s in scores]
    return np.array(w) / sum(w)


@pytest.mark.parametrize("a,b,top_k", [(5.0, 0.0, None), (20.0, -0.1, None), (8.0, 0.05, 6)])
def test_simans_draws_follow_equation_2(a, b, top_k):
    stats = oracle("scipy.stats")
    sampler = SimANSSampler(a=a, b=b, top_k=top_k)
    n = len(ROWS) if top_k is None else top_k
    draws = 6000
    counts = np.zeros(n)
    for epoch in range(draws):
        (pos,) = sampler(ROWS, SCORES, POS, 1, rng(epoch))
        counts[pos] += 1
    expected = eq2(SCORES[:n], POS, a, b) * draws
    assert stats.chisquare(counts, expected).pvalue > 1e-3


@pytest.mark.parametrize("b", [-0.2, 0.0, 0.1])
def test_simans_peak_sits_at_the_positive_score_plus_b(b):
    # the sign convention: a sharp Eq. 2 almost always picks the candidate closest to s_pos + b
    sampler = SimANSSampler(a=2000.0, b=b)
    picks = [int(sampler(ROWS, SCORES, POS, 1, rng(e))[0]) for e in range(50)]
    assert max(set(picks), key=picks.count) == int(np.argmin(np.abs(SCORES - POS - b)))


def test_simans_picks_k_distinct_from_the_top_k_in_candidate_order_and_needs_scores():
    sampler = SimANSSampler(a=1.0, top_k=5)
    for epoch in range(50):
        picks = sampler(ROWS, SCORES, POS, 3, rng(epoch))
        assert len(set(picks.tolist())) == 3 and picks.max() < 5 and list(picks) == sorted(picks)
    assert sampler(ROWS[:2], SCORES[:2], POS, 3, rng(0)).tolist() == [0, 1]
    with pytest.raises(ValueError, match="ANNRefresh"):
        sampler(ROWS, None, POS, 2, rng(0))
    with pytest.raises(ValueError, match="positive's score"):
        sampler(ROWS, SCORES, None, 2, rng(0))
    with pytest.raises(ValueError, match="a must be > 0"):
        SimANSSampler(a=0)
    with pytest.raises(ValueError, match="one score per row"):
        sampler(ROWS, SCORES[:3], POS, 2, rng(0))


@pytest.mark.parametrize("kwargs,condition", [
    ({"max_score": 0.8}, lambda s, p: s <= 0.8),                          # TopK-Abs
    ({"absolute_margin": 0.05}, lambda s, p: s + 0.05 <= p),               # TopK-MarginPos
    ({"relative_margin": 0.05}, lambda s, p: s <= p - abs(p) * 0.05),      # TopK-PercPos (95% of the positive)
], ids=["topk_abs", "topk_marginpos", "topk_percpos"])
def test_positive_aware_filters_match_filter_candidates_and_their_conditions(kwargs, condition):
    g = np.random.default_rng(0)
    for trial in range(30):
        scores = g.uniform(-0.5, 1.0, size=12).astype(np.float32)
        rows = g.permutation(100)[:12].astype(np.int64)
        pos = float(g.uniform(-0.3, 1.0))
        sampler = PositiveAwareFilter(TopKSampler(), **kwargs)
        picks = sampler(rows, scores, pos, 12, rng(trial))
        keep = filter_candidates(torch.from_numpy(scores)[None], torch.from_numpy(rows)[None], torch.tensor([pos]), **kwargs)[0]
        assert picks.tolist() == np.flatnonzero(keep.numpy()).tolist()
        assert picks.tolist() == [i for i, s in enumerate(scores) if condition(float(s), pos)]
        assert PositiveAwareFilter(TopKSampler(), **kwargs)(rows, scores, pos, 2, rng(trial)).tolist() == picks[:2].tolist()


def test_positive_aware_filter_then_an_inner_sampler_draws_only_survivors():
    sampler = PositiveAwareFilter(SimANSSampler(a=2.0), relative_margin=0.05)
    survivors = {i for i, s in enumerate(SCORES) if s <= POS * 0.95}
    for epoch in range(40):
        picks = sampler(ROWS, SCORES, POS, 2, rng(epoch))
        assert set(picks.tolist()) <= survivors and len(picks) == 2
    # without a positive score the margins drop nothing (as filter_candidates)
    assert PositiveAwareFilter(relative_margin=0.05)(ROWS, SCORES, None, 8, rng(0)).tolist() == list(range(8))
    with pytest.raises(ValueError, match="at least one of"):
        PositiveAwareFilter()


def test_uniform_sampler_is_the_static_recipe_draw_and_topk_the_head():
    for epoch in range(20):
        want = np.sort(rng(epoch).choice(len(ROWS), size=3, replace=False))  # the draw QueryDocTrainDataset always made
        assert UniformSampler()(ROWS, None, None, 3, rng(epoch)).tolist() == want.tolist()
    g = rng(0)
    assert UniformSampler()(ROWS[:2], None, None, 3, g).tolist() == [0, 1]
    assert g.integers(1 << 30) == rng(0).integers(1 << 30)  # fewer than k: the generator is left untouched (padding draws next)
    assert TopKSampler()(ROWS, None, None, 3, rng(0)).tolist() == [0, 1, 2]
    assert TopKSampler()(ROWS, None, None, 0, rng(0)).tolist() == []


@pytest.mark.parametrize("sampler", [UniformSampler(), SimANSSampler(a=3.0), PositiveAwareFilter(UniformSampler(), absolute_margin=0.0)],
                         ids=["uniform", "simans", "filter"])
def test_samplers_are_deterministic_per_seed_epoch_and_row(sampler):
    first = [sampler(ROWS, SCORES, POS, 2, rng(e, row=r)).tolist() for e in range(5) for r in range(4)]
    again = [sampler(ROWS, SCORES, POS, 2, rng(e, row=r)).tolist() for e in range(5) for r in range(4)]
    assert first == again
    assert len({tuple(x) for x in first}) > 1  # the epoch and the row change the draw
