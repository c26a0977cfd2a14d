"""``Mined.as_triplets`` joins pairs by anchor exactly as PML's ``convert_to_triplets`` (same order)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import oracle

lmu = oracle("pytorch_metric_learning.utils.loss_and_miner_utils")

from miners import Mined  # noqa: E402


@pytest.mark.parametrize("seed", range(30))
def test_join_equals_pml_convert_to_triplets(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_pos, n_neg = (int(x) for x in torch.randint(0, 40, (2,), generator=g))
    a1, a2 = torch.randint(0, 7, (n_pos,), generator=g), torch.randint(0, 7, (n_neg,), generator=g)
    p, n = torch.randint(0, 50, (n_pos,), generator=g), torch.randint(0, 50, (n_neg,), generator=g)
    pw, nw = torch.rand(n_pos, generator=g), torch.rand(n_neg, generator=g)
    a, tp, tn, w = Mined.from_pairs(a1, p, a2, n, pw, nw).as_triplets()
    ea, ep, en = lmu.convert_to_triplets((a1, p, a2, n), labels=None)
    assert torch.equal(a, ea) and torch.equal(tp, ep) and torch.equal(tn, en)
    pi, ni = torch.where(a1.unsqueeze(1) == a2.unsqueeze(0))
    torch.testing.assert_close(w, pw[pi] * nw[ni])
