"""NTXentLoss stays O(B * M): a batch whose [positive pairs x negative pairs] matrix (PML's form) would
need ~1 TB in float64 runs here, and matches a per-anchor loop."""

from __future__ import annotations

import torch

from losses import CosineSimilarity, NTXentLoss


def test_large_batch_matches_per_anchor_loop() -> None:
    g = torch.Generator().manual_seed(0)
    n, classes, t = 1024, 8, 0.07
    emb = torch.randn(n, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    got = NTXentLoss(temperature=t)(emb, labels)

    logits = CosineSimilarity()(emb) / t
    total, count = torch.zeros((), dtype=torch.float64), 0
    for a in range(n):
        same = labels == labels[a]
        same[a] = False
        pos, neg = logits[a, same], logits[a, labels != labels[a]]
        neg_lse = torch.logsumexp(neg, 0)
        total += (torch.logaddexp(pos, neg_lse) - pos).sum()
        count += len(pos)
    torch.testing.assert_close(got, total / count, rtol=1e-10, atol=0)
