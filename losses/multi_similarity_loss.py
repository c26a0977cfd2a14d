"""Multi-similarity loss."""

from __future__ import annotations

from torch import Tensor

from contracts.distances import BaseDistance, CosineSimilarity
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined
from losses.base_loss import BaseLoss
from losses.pair_matrix import any_mined, check_disjoint, log1p_sum, mined_pair_matrices, weighted_logsumexp
from losses.reducers import BaseReducer, LossPart, row_parts


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
        reducer: default (``None``) ``MeanReducer`` semantics as above; any ``losses.reducers``
            reducer sees the ``[B]`` row losses ``L_a`` as one ``"element"`` part named ``"loss"``.

    Synthetic points (``Mined.mix``) join as pairs weighted by their soft label ``w`` and ``1 - w``
    (``BaseLoss.apply_mix``): ``w`` multiplies their positive exponential, ``1 - w`` their negative
    one, Metrix's generalisation (Venkataramanan et al., ICLR 2022).
    """

    accepts_mix = True

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        distance: BaseDistance | None = None,
        reducer: BaseReducer | None = None,
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        self.alpha = alpha
        self.beta = beta
        self.base = base

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        rows = self._row_losses(inputs, mined)
        return self.zero_loss(inputs) if rows is None else rows.mean().to(inputs.emb.dtype)

    def tuple_losses(self, inputs: Inputs, mined: Mined | None) -> dict[str, LossPart]:
        """The ``[B]`` row losses ``L_a``: PML's ``"element"`` reduction type."""
        return row_parts(self._row_losses(inputs, mined), inputs.emb)

    def _row_losses(self, inputs: Inputs, mined: Mined | None) -> Tensor | None:
        """``L_a`` for every query row ``[B]`` (work dtype); None when nothing is mined."""
        pos_w, neg_w = mined_pair_matrices(inputs, mined, work_dtype(inputs.emb.dtype))
        if not (any_mined(pos_w) or any_mined(neg_w)):
            return None
        check_disjoint(pos_w, neg_w, type(self).__name__)
        mat = self.distance(inputs.emb, inputs.ref_emb)
        mat = mat.to(work_dtype(mat.dtype))
        # alpha * margin(S, base) = sign * alpha * (S - base): the affine part is folded into the reduction.
        sign = -1.0 if self.distance.is_inverted else 1.0
        pos = log1p_sum(weighted_logsumexp(mat, pos_w, scale=sign * self.alpha, offset=-sign * self.alpha * self.base)) / self.alpha
        neg = log1p_sum(weighted_logsumexp(mat, neg_w, scale=-sign * self.beta, offset=sign * self.beta * self.base)) / self.beta
        return pos + neg

