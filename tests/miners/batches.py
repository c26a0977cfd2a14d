"""Random batches for the miner tests: ties, singletons, empty cases, separate reference sets."""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch
from torch import Tensor


class Batch(NamedTuple):
    name: str
    emb: Tensor
    labels: Tensor
    ref_emb: Optional[Tensor]
    ref_labels: Optional[Tensor]


def _with_ties(emb: Tensor, g: torch.Generator) -> Tensor:
    """Copy some rows onto others so that distances tie exactly."""
    emb = emb.clone()
    n = len(emb)
    src = torch.randint(0, n, (max(1, n // 4),), generator=g)
    dst = torch.randint(0, n, (max(1, n // 4),), generator=g)
    emb[dst] = emb[src]
    return emb


def batches(seed: int, dtype: torch.dtype = torch.float64, n_random: int = 12) -> Iterator[Batch]:
    """Batches of one seed: random, tied, with a singleton class, degenerate, and with a reference set."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n_random):
        b = int(torch.randint(6, 40, (1,), generator=g))
        d = int(torch.randint(2, 12, (1,), generator=g))
        classes = int(torch.randint(2, 7, (1,), generator=g))
        emb = torch.randn(b, d, generator=g, dtype=torch.float64)
        labels = torch.randint(0, classes, (b,), generator=g)
        if i % 3 == 1:
            emb = _with_ties(emb, g)
        if i % 4 == 2:
            labels[0] = 1000  # a class with a single sample
        if i % 2 == 0:
            yield Batch(f"seed{seed}-batch{i}", emb.to(dtype), labels, None, None)
        else:
            m = int(torch.randint(4, 50, (1,), generator=g))
            ref = torch.randn(m, d, generator=g, dtype=torch.float64)
            ref[: min(m, b) // 2] = emb[: min(m, b) // 2]  # shared rows: exact ties with the queries
            ref_labels = torch.randint(0, classes, (m,), generator=g)
            ref_labels[: min(m, b) // 2] = labels[: min(m, b) // 2]
            yield Batch(f"seed{seed}-ref{i}", emb.to(dtype), labels, ref.to(dtype), ref_labels)
    emb = torch.randn(10, 5, generator=g, dtype=torch.float64).to(dtype)
    yield Batch(f"seed{seed}-one-class", emb, torch.zeros(10, dtype=torch.long), None, None)
    yield Batch(f"seed{seed}-all-distinct", emb, torch.arange(10), None, None)
    yield Batch(f"seed{seed}-single", emb[:1], torch.zeros(1, dtype=torch.long), None, None)
    quant = torch.randint(-1, 2, (16, 3), generator=g).double()  # few distinct directions: many ties
    quant[quant.abs().sum(1) == 0] = 1.0
    yield Batch(f"seed{seed}-quantized", quant.to(dtype), torch.randint(0, 3, (16,), generator=g), None, None)


def as_sets(out: tuple) -> tuple:
    """Sorted index tuples: ``(triplets,)`` or ``(pos_pairs, neg_pairs)``, for order-free comparison."""
    out = [torch.as_tensor(t).long().tolist() for t in out]
    if len(out) == 3:
        return (sorted(zip(*out)),)
    return (sorted(zip(out[0], out[1])), sorted(zip(out[2], out[3])))
