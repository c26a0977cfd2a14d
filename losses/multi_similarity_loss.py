"""Multi-similarity loss."""

from __future__ import annotations

from torch import Tensor

from losses.base_loss import BaseLoss
from losses.distances import BaseDistance, CosineSimilarity
from losses.pair_matrix import check_disjoint, log1p_sum, mined_pairs, pair_weight_matrix, weighted_logsumexp, work_dtype
from miners.mined import Mined
from miners.tuples import Inputs


class MultiSimilarityLoss(BaseLoss):
    """Soft-weighted pair loss over each anchor's positives and negatives.

    Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning"
    (CVPR 2019), Eq. 12. For anchor ``a`` with mined positives ``P(a)`` and negatives ``N(a)``::

        L_a = 1/alpha * log(1 + sum_{p in P(a)} w_ap exp(-alpha (S_ap - base)))
            + 1/beta  * log(1 + sum_{n in N(a)} w_an exp( beta (S_an - base)))

    and the loss is the mean of ``L_a`` over all ``B`` query rows (``MeanReducer``; rows with no
    mined pair contribute 0). For a distance instead of a similarity the signs flip, as in
    pytorch-metric-learning (``distance.margin``).

    Weights: a pair's weight ``w`` multiplies its exponential term inside the sum, so weight 0 is the
    same as not mining the pair. A pair listed more than once counts once, with its largest weight
    (PML builds a 0/1 mask). Without weights the value equals pytorch-metric-learning 2.9's
    ``MultiSimilarityLoss`` (except that PML returns 0 for a batch with at most one pair of each kind).

    Args:
        alpha: scale of the positive terms.
        beta: scale of the negative terms.
        base: the similarity offset ``lambda`` of Eq. 12.
        distance: default ``CosineSimilarity()``.

    Synthetic points (``Mined.mix``) join as pairs weighted by their soft label ``w`` and ``1 - w``
    (``BaseLoss.apply_mix``): ``w`` multiplies their positive exponential, ``1 - w`` their negative
    one, Metrix's generalisation (Venkataramanan et al., ICLR 2022).
    """

    accepts_mix = True

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, distance: BaseDistance | None = None) -> None:
        super().__init__(distance=distance)
        self.alpha = alpha
        self.beta = beta
        self.base = base

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        a1, p, a2, n, pw, nw = mined_pairs(inputs, mined)
        if len(a1) + len(a2) == 0:
            return self.zero_loss(inputs)
        mat = self.distance(inputs.emb, inputs.ref_emb)
        mat = mat.to(work_dtype(mat.dtype))
        shape = (len(inputs.emb), len(inputs.ref_emb))
        pos_w = pair_weight_matrix(a1, p, pw, shape, mat.dtype)
        neg_w = pair_weight_matrix(a2, n, nw, shape, mat.dtype)
        check_disjoint(pos_w, neg_w, type(self).__name__)
        pos = log1p_sum(weighted_logsumexp(self.alpha * self.distance.margin(mat, self.base), pos_w)) / self.alpha
        neg = log1p_sum(weighted_logsumexp(self.beta * self.distance.margin(self.base, mat), neg_w)) / self.beta
        return (pos + neg).mean().to(inputs.emb.dtype)

