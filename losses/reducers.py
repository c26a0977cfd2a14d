"""Reductions of per-tuple losses to a scalar, with pytorch-metric-learning's reducer semantics."""

from __future__ import annotations

from torch import Tensor


def weighted(losses: Tensor, weights: Tensor | None) -> Tensor:
    return losses if weights is None else losses * weights.to(losses.dtype)


def mean_nonzero(losses: Tensor, zero: Tensor) -> Tensor:
    """Mean over the entries that are > 0 (``AvgNonZeroReducer``); ``zero`` when none is."""
    nonzero = losses > 0
    count = int(nonzero.sum())
    if count == 0:
        return zero
    return losses.sum() / count


def mean(losses: Tensor, zero: Tensor) -> Tensor:
    """Plain mean (``MeanReducer``); ``zero`` for an empty set."""
    if losses.numel() == 0:
        return zero
    return losses.mean()
