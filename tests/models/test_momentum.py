"""MomentumEncoder: MoCo's key encoder is an exact EMA of the query encoder and never gets gradient."""

import torch
from torch import nn

from models import MomentumEncoder


def test_ema_update_is_exact_and_buffers_are_its_own():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    key = MomentumEncoder(online, momentum=0.9)
    for a, b in zip(key.parameters(), online.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    before = [p.detach().clone() for p in key.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online[1].running_mean.fill_(5.0)
    key.update(online)
    for k, k0, q in zip(key.parameters(), before, online.parameters()):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q, rtol=0, atol=1e-15)
    assert torch.equal(key.encoder[1].running_mean, torch.zeros(3, dtype=torch.float64))


def test_forward_has_no_graph_and_update_checks_the_architecture():
    online = nn.Linear(4, 3)
    key = MomentumEncoder(online)
    out = key(torch.randn(2, 4, requires_grad=True))
    assert not out.requires_grad
    try:
        key.update(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)))
    except ValueError as err:
        assert "parameter tensors" in str(err)
    else:
        raise AssertionError("a different architecture must be rejected")
    assert key.out_features == 3  # attributes of the wrapped encoder are reachable
