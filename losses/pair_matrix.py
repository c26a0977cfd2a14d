"""Dense ``[B, M]`` views of mined pairs, and the masked log-sum-exp that the softmax-style losses share.

Matrix-based losses (multi-similarity, SupCon, circle, InfoNCE) work on the full similarity matrix
and need to know which entries are mined and with what weight. ``pair_weight_matrix`` scatters
pair weights into a ``[B, M]`` matrix (0 = not mined), ``weighted_logsumexp`` computes
``log sum_j w_j exp(x_j)`` over the mined entries of each row with finite gradients even for rows
that have none. Everything stays ``O(B * M)`` in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from miners.mined import Mined, Pairs
from miners.tuples import Inputs, all_pairs


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a loss computes in: float32 for half inputs (exp/logsumexp overflow in fp16), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_weights(weights: Tensor | None, what: str) -> None:
    """Raise ``ValueError`` if per-tuple weights are negative or not finite."""
    if weights is None or weights.numel() == 0:
        return
    if not torch.isfinite(weights).all() or bool((weights < 0).any()):
        raise ValueError(f"Mined {what} must be finite and >= 0; got min {float(weights.min())}, max {float(weights.max())}")


def mined_pairs(inputs: Inputs, mined: Mined | None) -> Pairs:
    """The pairs a pair-based loss works on: every valid pair when ``mined`` is None, else the mined
    ones (triplets become their two pairs); per-pair weights checked to be finite and >= 0."""
    if mined is None:
        mined = all_pairs(inputs.labels, inputs.ref_labels, inputs.same_set)
    pairs = mined.as_pairs()
    check_weights(pairs.pos_weights, "pos_weights")
    check_weights(pairs.neg_weights, "neg_weights")
    return pairs


def pair_weight_matrix(
    rows: Tensor,
    cols: Tensor,
    weights: Tensor | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
    accumulate: bool = False,
) -> Tensor:
    """Scatter pair weights into a dense matrix ``[B, M]``; entries of unlisted pairs are 0.

    ``rows, cols: [P]`` index the pairs, ``weights: [P]`` (``None`` means all ones). A pair listed
    more than once keeps its largest weight (``accumulate=False``: a mask, as pytorch-metric-learning's
    matrix-based losses build it) or the sum of its weights (``accumulate=True``: every listing is a
    separate term, as its pair-based losses treat duplicates).
    """
    out = torch.zeros(shape, dtype=dtype, device=rows.device)
    if len(rows) == 0:
        return out
    w = torch.ones(len(rows), dtype=dtype, device=rows.device) if weights is None else weights.to(dtype)
    if accumulate:
        return out.index_put_((rows, cols), w, accumulate=True)
    flat = rows * shape[1] + cols
    return out.view(-1).scatter_reduce(0, flat, w, reduce="amax", include_self=True).view(shape)


def weighted_logsumexp(x: Tensor, weights: Tensor, dim: int = 1) -> Tensor:
    """``log sum_j w_j exp(x_j)`` along ``dim`` over the entries with ``w_j > 0``.

    ``x, weights: [B, M]`` -> ``[B]``. A row without any such entry gives ``-inf`` with zero
    gradient (never NaN). With ``w_j = 1`` the entry is exactly ``x_j``.
    """
    keep = weights > 0
    empty = ~keep.any(dim=dim, keepdim=True)
    log_w = torch.where(keep, weights, torch.ones_like(weights)).log()
    z = torch.where(keep, x + log_w, torch.full_like(x, float("-inf")))
    z = z.masked_fill(empty, 0.0)
    out = torch.logsumexp(z, dim=dim, keepdim=True).masked_fill(empty, float("-inf"))
    return out.squeeze(dim)


def log1p_sum(lse: Tensor) -> Tensor:
    """``log(1 + exp(lse))`` (a log-sum-exp with an extra zero term); 0 for ``lse = -inf``."""
    return torch.logaddexp(lse, torch.zeros_like(lse))


def check_disjoint(pos_w: Tensor, neg_w: Tensor, who: str) -> None:
    """Raise ``ValueError`` if a pair is mined both as a positive and as a negative (``[B, M]`` weight matrices)."""
    both = (pos_w > 0) & (neg_w > 0)
    if bool(both.any()):
        i, j = (int(v) for v in both.nonzero()[0])
        raise ValueError(f"{who}: pair ({i}, {j}) is mined both as a positive and as a negative; each pair must be one or the other")
