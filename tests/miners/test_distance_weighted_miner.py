"""``DistanceWeightedMiner``: the sampling distribution (exact) and the samples (statistically).

1. The ``[B, M]`` probabilities equal the weights pytorch-metric-learning 2.9 computes (captured
   from its sampler) and a brute-force loop over the formula of Wu et al. 2017, Sec. 4.
2. Over many draws, the sampled negatives of each anchor follow those probabilities and the
   positives are uniform (chi-square goodness of fit), and each anchor gets as many triplets as
   PML gives it.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tests.helpers import oracle

PM = oracle("pytorch_metric_learning.miners")
lmu = oracle("pytorch_metric_learning.utils.loss_and_miner_utils")
stats = oracle("scipy.stats")

from losses import CosineSimilarity, LpDistance  # noqa: E402
from miners import DistanceWeightedMiner  # noqa: E402


def _batch(seed: int, b: int = 24, d: int = 8, classes: int = 4, ref: bool = False):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (b,), generator=g)
    if not ref:
        return emb, labels, None, None
    m = b + 7
    ref_emb = torch.randn(m, d, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, classes, (m,), generator=g)
    return emb, labels, ref_emb, ref_labels


def _pml_weights(monkeypatch, miner, emb, labels, ref_emb, ref_labels):
    captured = {}
    real = lmu.get_random_triplet_indices

    def capture(labels, ref_labels=None, t_per_anchor=None, weights=None):
        captured["weights"] = weights.clone()
        return real(labels, ref_labels=ref_labels, t_per_anchor=t_per_anchor, weights=weights)

    monkeypatch.setattr(lmu, "get_random_triplet_indices", capture)
    out = miner(emb, labels, ref_emb, None if ref_labels is None else ref_labels.clone())
    return captured["weights"], out


def _brute_force(emb, labels, ref_emb, ref_labels, cutoff, nonzero_cutoff):
    """Eq. 3-4 one pair at a time: w = 1/q(max(d, cutoff)), 0 for positives and d >= nonzero_cutoff."""
    ref_emb = emb if ref_emb is None else ref_emb
    ref_labels = labels if ref_labels is None else ref_labels
    n = emb.shape[1]
    q = torch.nn.functional.normalize(emb, dim=1)
    r = torch.nn.functional.normalize(ref_emb, dim=1)
    out = torch.zeros(len(q), len(r), dtype=torch.float64)
    for i in range(len(q)):
        for j in range(len(r)):
            d = max(float(torch.linalg.vector_norm(q[i] - r[j])), cutoff)
            if labels[i] == ref_labels[j] or d >= nonzero_cutoff:
                continue
            log_q = (n - 2) * math.log(d) + (n - 3) / 2 * math.log(1 - d * d / 4)
            out[i, j] = math.exp(-log_q)
        total = out[i].sum()
        out[i] = out[i] / total if total > 0 else float("nan")
    return out


@pytest.mark.parametrize("ref", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("cutoffs", [(0.5, 1.4), (0.8, 1.2), (0.3, 2.0)])
def test_probabilities_equal_pml_and_formula(monkeypatch, ref, seed, cutoffs) -> None:
    emb, labels, ref_emb, ref_labels = _batch(seed, ref=ref)
    ours = DistanceWeightedMiner(*cutoffs)
    probs = ours.negative_probabilities(emb, labels, ref_emb, ref_labels)
    theirs, _ = _pml_weights(monkeypatch, PM.DistanceWeightedMiner(*cutoffs), emb, labels, ref_emb, ref_labels)
    torch.testing.assert_close(probs, theirs, rtol=1e-10, atol=1e-14, equal_nan=True)
    torch.testing.assert_close(probs, _brute_force(emb, labels, ref_emb, ref_labels, *cutoffs), rtol=1e-9, atol=1e-14, equal_nan=True)
    assert torch.isfinite(probs).any()


@pytest.mark.parametrize("ref", [False, True])
def test_triplet_counts_per_anchor_equal_pml(ref) -> None:
    for seed in range(4):
        emb, labels, ref_emb, ref_labels = _batch(seed, ref=ref)
        a, p, n = DistanceWeightedMiner()(emb, labels, ref_emb, ref_labels).to_tuple()
        pa, pp, pn = PM.DistanceWeightedMiner()(emb, labels, ref_emb, None if ref_labels is None else ref_labels.clone())
        assert Counter(a.tolist()) == Counter(pa.tolist())
        rl = labels if ref_labels is None else ref_labels
        assert bool((labels[a] == rl[p]).all()) and bool((labels[a] != rl[n]).all())
        if ref_emb is None:
            assert bool((a != p).all())


def test_samples_follow_the_distribution() -> None:
    torch.manual_seed(0)
    emb, labels, _, _ = _batch(11, b=16, d=6, classes=3)
    miner = DistanceWeightedMiner(cutoff=0.3, nonzero_loss_cutoff=1.9)
    probs = miner.negative_probabilities(emb, labels)
    draws = 600
    neg_counts = torch.zeros_like(probs)
    pos_counts = torch.zeros_like(probs)
    for _ in range(draws):
        a, p, n = miner(emb, labels).to_tuple()
        neg_counts.index_put_((a, n), torch.ones(len(a), dtype=probs.dtype), accumulate=True)
        pos_counts.index_put_((a, p), torch.ones(len(a), dtype=probs.dtype), accumulate=True)
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    same.fill_diagonal_(False)
    tested = 0
    for i in range(len(labels)):
        if not torch.isfinite(probs[i]).all():
            continue
        support = probs[i] > 0
        observed = neg_counts[i, support]
        expected = probs[i, support] * observed.sum()
        assert neg_counts[i, ~support].sum() == 0, f"anchor {i} drew a negative with weight 0"
        assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-4, f"anchor {i}: negatives"
        # the distribution is far from uniform, so a uniform sampler would fail the same test
        uniform = torch.full_like(expected, float(observed.sum()) / int(support.sum()))
        if int(support.sum()) > 2:
            assert stats.chisquare(observed.numpy(), uniform.numpy()).pvalue < 1e-4
        pos_obs = pos_counts[i, same[i]]
        pos_exp = torch.full_like(pos_obs, float(pos_obs.sum()) / len(pos_obs))
        assert stats.chisquare(pos_obs.numpy(), pos_exp.numpy()).pvalue > 1e-4, f"anchor {i}: positives"
        tested += 1
    assert tested >= 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs(dtype) -> None:
    emb, labels, _, _ = _batch(3, d=8)
    miner = DistanceWeightedMiner()
    a, p, n = miner(emb.to(dtype), labels).to_tuple()
    assert len(a) > 0 and bool((labels[a] != labels[n]).all())
    probs = miner.negative_probabilities(emb.to(dtype), labels)
    exact = miner.negative_probabilities(emb, labels)
    ok = torch.isfinite(exact).all(dim=1) & torch.isfinite(probs).all(dim=1)
    assert ok.sum() > 0
    # near nonzero_loss_cutoff a weight flips to 0 when rounding moves the distance across it
    atol = {torch.float32: 1e-5, torch.float16: 0.02, torch.bfloat16: 0.1}[dtype]
    torch.testing.assert_close(probs[ok].double(), exact[ok], rtol=0, atol=atol)
    torch.testing.assert_close(probs[ok].double().sum(dim=1), torch.ones(int(ok.sum()), dtype=torch.float64), rtol=0, atol=0.02)


def test_nothing_to_sample_and_bad_distance() -> None:
    emb, _, _, _ = _batch(0)
    assert len(DistanceWeightedMiner()(emb, torch.zeros(len(emb), dtype=torch.long))) == 0
    assert len(DistanceWeightedMiner()(emb, torch.arange(len(emb)))) == 0
    with pytest.raises(ValueError, match="LpDistance"):
        DistanceWeightedMiner(distance=CosineSimilarity())
    with pytest.raises(ValueError, match="LpDistance"):
        DistanceWeightedMiner(distance=LpDistance(power=2))
