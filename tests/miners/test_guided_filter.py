"""``GuidedFilter`` (GISTEmbed): its masks against a brute-force loop over the guide's scores."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miners.guided_filter import GuidedFilter


class HashGuide(nn.Module):
    """A fixed "text encoder": a seeded random vector per string (``encode`` only)."""

    embed_dim = 8

    def encode(self, texts, batch_size=64):
        return torch.stack([torch.randn(self.embed_dim, generator=torch.Generator().manual_seed(sum(map(ord, t)))) for t in texts])


def brute(q, c, pos_col, margin, mode, positives=None):
    q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    out = torch.zeros(len(q), len(c), dtype=torch.bool)
    for i in range(len(q)):
        sp = float(q[i] @ c[pos_col[i]])
        for j in range(len(c)):
            s = float(q[i] @ c[j])
            thr = sp - margin if mode == "absolute" else sp - abs(sp) * margin
            known = positives is not None and bool(positives[i, j])
            out[i, j] = s > thr and j != pos_col[i] and not known
    return out


@pytest.mark.parametrize("mode,margin", [("absolute", 0.0), ("absolute", 0.3), ("relative", 0.2), ("relative", -0.1)])
def test_mask_equals_a_brute_force_loop(mode, margin):
    g = torch.Generator().manual_seed(0)
    q, c = torch.randn(6, 5, generator=g), torch.randn(14, 5, generator=g)
    c[3] = q[1] * 2 + 0.01  # a near duplicate of query 1: masked for it
    pos_col = torch.tensor([0, 1, 2, 3, 4, 5])
    positives = torch.zeros(6, 14, dtype=torch.bool)
    positives[2, 9] = True  # a second known positive is never masked
    filt = GuidedFilter(HashGuide(), margin=margin, mode=mode)
    got = filt(filt_norm(q), filt_norm(c), pos_col, positives=positives)
    assert torch.equal(got, brute(q, c, pos_col, margin, mode, positives))
    assert got[1, 3] or mode == "relative" and margin < 0


def filt_norm(x):
    return F.normalize(x, dim=-1)


def test_encode_is_normalised_frozen_and_eval():
    guide = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    guide.encode = lambda texts, batch_size=64: torch.ones(len(texts), 3)
    filt = GuidedFilter(guide)
    filt.train()
    assert not filt.training and not guide.training and not any(p.requires_grad for p in guide.parameters())
    emb = filt.encode(["a", "b"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="mode"):
        GuidedFilter(HashGuide(), mode="percent")
    with pytest.raises(TypeError, match="encode"):
        GuidedFilter(nn.Linear(2, 2))
    filt = GuidedFilter(HashGuide())
    with pytest.raises(ValueError, match="pos_col"):
        filt(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        filt(torch.randn(3, 4), torch.randn(5, 3), torch.tensor([0, 1, 2]))
