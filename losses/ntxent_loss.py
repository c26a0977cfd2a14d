"""NT-Xent / InfoNCE loss with labels."""

from __future__ import annotations

import torch
from torch import Tensor

from contracts.distances import BaseDistance, CosineSimilarity
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined
from losses.base_loss import BaseLoss
from losses.pair_matrix import any_mined, softmax_pairs, weighted_logsumexp
from losses.reducers import BaseReducer, LossPart


class NTXentLoss(BaseLoss):
    """Normalised-temperature cross entropy (InfoNCE): one softmax term per positive pair.

    van den Oord et al., "Representation Learning with Contrastive Predictive Coding" (2018), Eq. 4;
    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR,
    2020), Eq. 1. With labels, every positive pair ``(a, p)`` gives one term whose denominator holds
    that positive and every mined negative of the same anchor (pytorch-metric-learning's semantics)::

        l(a, p) = -w+_ap * log( exp(s_ap / t) / (exp(s_ap / t) + sum_{n in N(a)} w-_an exp(s_an / t)) )

    The loss is the mean of ``l`` over the positive pairs (``MeanReducer``: the sum divided by the
    number of positive pairs, not by the sum of weights). ``s`` is the similarity, or minus the
    distance for a distance. A positive pair whose anchor has no negative gives ``l = 0``; with no
    positive or no negative pair at all the loss is 0.

    Weights: ``pos_weights`` multiply each positive pair's term; ``neg_weights`` multiply each
    negative's exponential in its anchor's denominator. A negative pair listed twice counts twice
    (its weights add), as in PML. Without weights the value equals pytorch-metric-learning 2.9's
    ``NTXentLoss`` (except that PML returns 0 for a batch with at most one pair of each kind).

    Memory is ``O(B * M)``: the negatives of each anchor are summed once with a masked log-sum-exp
    and shared by all its positive pairs (PML materialises ``[P, N]``, which is ``O(B^3)``).

    Args:
        temperature: the softmax temperature ``t``.
        distance: default ``CosineSimilarity()``.
        reducer: default (``None``) ``MeanReducer`` semantics as above; any ``losses.reducers``
            reducer sees one ``"pos_pair"`` part named ``"loss"`` (one term per positive pair).

    Synthetic points (``Mined.mix``, ``BaseLoss.apply_mix``): a point with soft label 0 is one more
    negative in its anchor's denominator, as MoCHi's synthetic hard negatives (Kalantidis et al.,
    "Hard Negative Mixing for Contrastive Learning", NeurIPS 2020).
    """

    accepts_mix = True

    def __init__(self, temperature: float = 0.07, distance: BaseDistance | None = None, reducer: BaseReducer | None = None) -> None:
        super().__init__(distance=distance, reducer=reducer)
        if temperature <= 0:
            raise ValueError(f"NTXentLoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        part = self._pair_losses(inputs, mined)
        return self.zero_loss(inputs) if part is None else part.losses.mean().to(inputs.emb.dtype)

    def tuple_losses(self, inputs: Inputs, mined: Mined | None) -> dict[str, LossPart]:
        """One term per positive pair: PML's ``"pos_pair"`` reduction type."""
        part = self._pair_losses(inputs, mined)
        if part is None:
            empty = torch.empty(0, dtype=torch.long, device=inputs.emb.device)
            part = LossPart(inputs.emb.new_zeros(0), (empty, empty), "pos_pair")
        return {"loss": part}

    def _pair_losses(self, inputs: Inputs, mined: Mined | None) -> LossPart | None:
        """``l(a, p)`` of every positive pair, weighted (work dtype); None without a positive or a negative."""
        dtype = work_dtype(inputs.emb.dtype)
        a1, p, pw, _, neg_w = softmax_pairs(inputs, mined, dtype, dense_positives=False)
        if len(a1) == 0 or not any_mined(neg_w):
            return None
        mat = self.distance(inputs.emb, inputs.ref_emb).to(dtype)
        scale = (1.0 if self.distance.is_inverted else -1.0) / self.temperature  # logits s / t
        neg_lse = weighted_logsumexp(mat, neg_w, scale=scale)[a1]
        pos = mat[a1, p] * scale
        losses = torch.logaddexp(pos, neg_lse) - pos
        if pw is not None:
            losses = losses * pw.to(losses.dtype)
        return LossPart(losses, (a1, p), "pos_pair")
