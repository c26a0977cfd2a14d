"""``HardNegativeTopKMiner`` against a brute-force loop over anchors (sort by closeness, then index)."""

from __future__ import annotations

import pytest
import torch

from losses import CosineSimilarity, DotProductSimilarity, LpDistance
from miners import HardNegativeTopKMiner, TripletMarginMiner
from tests.miners.batches import as_sets, batches

DISTANCES = {"lp": LpDistance, "cos": CosineSimilarity, "dot": DotProductSimilarity}


def _brute_force(emb, labels, ref_emb, ref_labels, k, margin, distance):
    same_set = ref_emb is None
    ref_emb = emb if same_set else ref_emb
    ref_labels = labels if same_set else ref_labels
    mat = distance(emb, None if same_set else ref_emb).tolist()
    sign = -1.0 if distance.is_inverted else 1.0  # sort key: smaller = closer
    pos_pairs, neg_pairs = [], []
    for a in range(len(emb)):
        positives = [j for j in range(len(ref_emb)) if ref_labels[j] == labels[a] and not (same_set and j == a)]
        pos_pairs += [(a, p) for p in positives]
        negatives = [j for j in range(len(ref_emb)) if ref_labels[j] != labels[a]]
        if margin is not None:
            if not positives:
                negatives = []
            else:
                farthest = max(sign * mat[a][p] for p in positives)
                negatives = [n for n in negatives if sign * mat[a][n] < farthest + margin]
        negatives.sort(key=lambda n: (sign * mat[a][n], n))
        neg_pairs += [(a, n) for n in negatives[:k]]
    return sorted(pos_pairs), sorted(neg_pairs)


@pytest.mark.parametrize("k", [1, 3, 100])
@pytest.mark.parametrize("margin", [None, 0.0, 0.3])
@pytest.mark.parametrize("dist", sorted(DISTANCES))
def test_equals_brute_force(k, margin, dist) -> None:
    distance = DISTANCES[dist]()
    miner = HardNegativeTopKMiner(k=k, margin=margin, distance=distance)
    seen_ties = 0
    for seed in (k,):
        for b in batches(seed):
            out = miner(b.emb, b.labels, b.ref_emb, b.ref_labels)
            expected = _brute_force(b.emb, b.labels, b.ref_emb, b.ref_labels, k, margin, distance)
            assert as_sets(out.to_tuple()) == expected, b.name
            seen_ties += "quantized" in b.name
    assert seen_ties


def test_margin_keeps_exactly_the_violating_negatives() -> None:
    """With k large, the margin filter gives the negatives of TripletMarginMiner('all', margin) (strict)."""
    for b in batches(4):
        if b.ref_emb is not None:
            continue
        topk = HardNegativeTopKMiner(k=10_000, margin=0.3)(b.emb, b.labels)
        a, p, n = TripletMarginMiner(margin=0.3, type_of_triplets="all")(b.emb, b.labels).to_tuple()
        mat = LpDistance()(b.emb)
        strict = mat[a, n] - mat[a, p] < 0.3  # TripletMarginMiner's band includes the edge
        assert sorted(set(zip(a[strict].tolist(), n[strict].tolist()))) == as_sets(topk.to_tuple())[1], b.name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_brute_force_on_the_same_matrix(dtype) -> None:
    distance = CosineSimilarity()
    miner = HardNegativeTopKMiner(k=3, margin=0.5, distance=distance)
    for b in batches(2):
        emb = b.emb.to(dtype)
        ref = None if b.ref_emb is None else b.ref_emb.to(dtype)
        out = miner(emb, b.labels, ref, b.ref_labels)
        expected = _brute_force(emb, b.labels, ref, b.ref_labels, 3, 0.5, distance)
        assert as_sets(out.to_tuple()) == expected, b.name


def test_bad_k() -> None:
    with pytest.raises(ValueError, match="k=0"):
        HardNegativeTopKMiner(k=0)
