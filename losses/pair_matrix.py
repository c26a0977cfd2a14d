"""Dense ``[B, M]`` views of mined pairs, and the masked log-sum-exp that the softmax-style losses share.

Matrix-based losses (multi-similarity, SupCon, circle, InfoNCE) work on the full similarity matrix
and need to know which entries are mined and with what weight. ``mined_pair_matrices`` gives them
as ``[B, M]`` weight matrices (0 or False = not mined), ``weighted_logsumexp`` computes
``log sum_j w_j exp(x_j)`` over the mined entries of each row with finite gradients even for rows
that have none. Everything stays ``O(B * M)`` in memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from contracts.distances import BaseDistance
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined, Pairs, check_weights, pair_weight_matrix
from contracts.relevance import relevance_masks, valid_pairs


def mined_pairs(inputs: Inputs, mined: Mined | None) -> Pairs:
    """The pairs a pair-based loss works on: every valid pair when ``mined`` is None, else the mined
    ones (triplets become their two pairs); per-pair weights checked to be finite and >= 0."""
    if mined is None:
        mined = valid_pairs(inputs)
    pairs = mined.as_pairs()
    check_weights(pairs.pos_weights, "pos_weights")
    check_weights(pairs.neg_weights, "neg_weights")
    return pairs


#: below ``B * M / FEW_TUPLES_RATIO`` listed tuples a loss computes the distances of the listed rows
#: only, ``O(T D)``, instead of the ``B x M`` matrix. Measured crossover on CPU at B = 2048, D = 512
#: with the miner's matrix reused (the dense path then costs only the backward products, sparse when
#: few entries have a gradient): about 8k tuples; row-wise work is memory-bound (a dozen ``T x D``
#: passes).
FEW_TUPLES_RATIO = 500


def few_tuples(n_tuples: int, inputs: Inputs) -> bool:
    """Whether ``n_tuples`` listed tuples are few enough for ``listed_distances`` to beat the full matrix."""
    return n_tuples * FEW_TUPLES_RATIO <= len(inputs.emb) * len(inputs.ref_emb)


def listed_distances(distance: BaseDistance, inputs: Inputs, *pairs: tuple[Tensor, Tensor]) -> list[Tensor]:
    """``distance(emb[a], ref_emb[b])`` for each listed ``(a, b)`` index pair, normalising every embedding once.

    Equals the entries ``mat[a, b]`` of the full matrix (``distance.pairwise`` semantics), with
    gradient, at ``O(T D)`` cost. Anchors listed as ``0..B-1`` in order (batch-hard) are not gathered.
    """
    q = distance.maybe_normalize(inputs.emb)
    r = q if inputs.same_set else distance.maybe_normalize(inputs.ref_emb)
    out = []
    for a, b in pairs:
        every_row_once = len(a) == len(q) and bool((a == torch.arange(len(q), device=a.device)).all())
        # index_select: its backward (index_add_) is several times faster on CPU than indexing's (index_put_)
        d = distance.pairwise_distance(q if every_row_once else q.index_select(0, a), r.index_select(0, b))
        out.append(d if distance.power == 1 else d**distance.power)
    return out


def mined_pair_matrices(inputs: Inputs, mined: Mined | None, dtype: torch.dtype, accumulate: bool = False) -> tuple[Tensor, Tensor]:
    """Dense ``[B, M]`` weights ``(pos_w, neg_w)`` of the pairs a matrix-based loss works on.

    Every valid pair (bool relevance masks) when ``mined`` is None, else ``mined.pair_matrices`` (masks
    as they are, pair lists scattered; see there for ``accumulate``). Bool matrices mean weight 1.
    Listed weights are checked to be finite and >= 0 (``Mined.validate`` checks float masks).
    """
    if mined is None:
        return relevance_masks(inputs)
    if not mined.has_masks:
        pairs = mined.as_pairs()
        check_weights(pairs.pos_weights, "pos_weights")
        check_weights(pairs.neg_weights, "neg_weights")
    return mined.pair_matrices((len(inputs.emb), len(inputs.ref_emb)), dtype, accumulate)


def softmax_pairs(
    inputs: Inputs, mined: Mined | None, dtype: torch.dtype, dense_positives: bool = True
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor]:
    """``(a1, p, pw, pos_w, neg_w)`` for the InfoNCE-style losses: one term per listed positive pair.

    The positive pairs are listed (with weights ``pw`` or None), and both kinds are also given as
    dense ``[B, M]`` weights in which a pair listed twice counts twice (weights summed; PML's
    pair-based semantics); ``pos_w`` may be None from lists unless ``dense_positives``. From masks
    or ``mined=None`` only the positives are listed: the negatives (nearly all of the ``B x M``
    pairs) stay a mask.
    """
    if mined is None or mined.has_masks:
        pos_w, neg_w = mined_pair_matrices(inputs, mined, dtype)
        a1, p = torch.where(is_mined(pos_w))
        return a1, p, (None if pos_w.dtype == torch.bool else pos_w[a1, p]), pos_w, neg_w
    a1, p, a2, n, pw, nw = mined_pairs(inputs, mined)
    shape = (len(inputs.emb), len(inputs.ref_emb))
    pos_w = pair_weight_matrix(a1, p, pw, shape, dtype, accumulate=True) if dense_positives else None
    return a1, p, pw, pos_w, pair_weight_matrix(a2, n, nw, shape, dtype, accumulate=True)


def any_mined(weights: Tensor) -> bool:
    """Whether a pair weight matrix (bool or float) has a mined entry (``count_nonzero``: several times faster than ``any`` on CPU)."""
    return bool(torch.count_nonzero(weights))


def is_mined(weights: Tensor) -> Tensor:
    """Bool ``[B, M]``: which entries of a pair weight matrix (bool or float) are mined."""
    return weights if weights.dtype == torch.bool else weights > 0


class _WeightedLogSumExp(torch.autograd.Function):
    """Forward and analytic backward of ``weighted_logsumexp``: a few ``[B, M]`` passes instead of autograd's dozen.

    Two CPU slow paths are avoided on purpose: boolean ``masked_fill``/``where`` (several times
    slower than float arithmetic) and ``exp`` of arguments near or below ``log(finfo.tiny)`` (-inf,
    or the underflow of a masked entry; 10-30x slower than ``exp`` of normal arguments). Unmined
    entries are pushed to ``-finfo.max`` arithmetically; all exponents are clamped to
    ``log(tiny) + 2`` and whatever lands there (the unmined entries, and terms below ``1e-37`` times
    the row's largest, which float cannot add to it anyway) is set to exactly 0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, dim: int, scale: float, offset: float) -> Tensor:
        finfo = torch.finfo(x.dtype)
        big = torch.tensor(-finfo.max, dtype=x.dtype, device=x.device)
        not_mined = (~weights if weights.dtype == torch.bool else weights <= 0).to(x.dtype)
        z = torch.mul(x, scale).addcmul_(not_mined, big)  # unmined: -finfo.max (|scale x| << finfo.max)
        top = z.amax(dim=dim, keepdim=True)
        empty = top < -0.5 * finfo.max  # rows without a mined entry
        top.masked_fill_(empty, float("inf"))
        floor = math.log(finfo.tiny) + 2  # exp is fast from here up (and slow on -inf and near underflow)
        terms = z.sub_(top).clamp_(min=floor).exp_()
        terms = torch.threshold_(terms, 1.5 * math.exp(floor), 0.0)  # the clamped entries -> exactly 0
        if weights.dtype != torch.bool:
            terms.mul_(weights.to(terms.dtype))
        total = terms.sum(dim=dim, keepdim=True)
        out = total.log().add_(top).masked_fill_(empty, float("-inf")).add_(offset)
        ctx.dim, ctx.scale = dim, scale
        ctx.save_for_backward(terms.div_(total.masked_fill_(empty, 1.0)))  # the softmax over the mined entries
        return out.squeeze(dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (softmax,) = ctx.saved_tensors
        return softmax * (grad * ctx.scale).unsqueeze(ctx.dim), None, None, None, None


def weighted_logsumexp(x: Tensor, weights: Tensor, dim: int = 1, scale: float = 1.0, offset: float = 0.0) -> Tensor:
    """``log sum_j w_j exp(scale * x_j + offset)`` along ``dim`` over the entries with ``w_j > 0`` (or ``True``).

    ``x, weights: [B, M]`` -> ``[B]``; ``weights`` bool (weight 1) or float, without gradient. A row
    without any such entry gives ``-inf`` with zero gradient (never NaN). With ``w_j = 1`` the entry
    is exactly ``scale * x_j + offset``. The gradient is ``scale`` times the softmax of
    ``scale * x + log w`` over the mined entries. ``scale`` and ``offset`` are folded into the
    reduction so that an affine logit (``alpha * (S - lambda)``) costs no extra ``[B, M]`` pass.
    """
    if weights.requires_grad:
        raise ValueError("weighted_logsumexp: weights must not require gradient (they are constants: mined pairs, soft labels)")
    if weights.shape != x.shape:
        raise ValueError(f"weighted_logsumexp: weights have shape {tuple(weights.shape)}, expected {tuple(x.shape)} like x")
    return _WeightedLogSumExp.apply(x, weights, dim, float(scale), float(offset))


def log1p_sum(lse: Tensor) -> Tensor:
    """``log(1 + exp(lse))`` (a log-sum-exp with an extra zero term); 0 for ``lse = -inf``."""
    return torch.logaddexp(lse, torch.zeros_like(lse))


def check_disjoint(pos_w: Tensor, neg_w: Tensor, who: str) -> None:
    """Raise ``ValueError`` if a pair is mined both as a positive and as a negative (``[B, M]`` weight matrices)."""
    both = is_mined(pos_w) & is_mined(neg_w)
    if any_mined(both):
        i, j = (int(v) for v in both.nonzero()[0])
        raise ValueError(f"{who}: pair ({i}, {j}) is mined both as a positive and as a negative; each pair must be one or the other")
