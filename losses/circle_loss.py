"""Circle loss (pair form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contracts.distances import BaseDistance, CosineSimilarity
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined
from losses.base_loss import BaseLoss
from losses.pair_matrix import any_mined, check_disjoint, is_mined, mined_pair_matrices, weighted_logsumexp
from losses.reducers import BaseReducer, LossPart, mean_nonzero, row_parts


class CircleLoss(BaseLoss):
    """Circle loss with pair-wise labels, self-paced weights on each similarity.

    Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization" (CVPR 2020),
    Eq. 6 with the settings of Eq. 8 (``O_p = 1 + m``, ``O_n = -m``, ``Delta_p = 1 - m``,
    ``Delta_n = m``). For anchor ``a``::

        alpha_p = [O_p - s_ap]_+ (no gradient)       alpha_n = [s_an - O_n]_+ (no gradient)
        L_a = softplus( log sum_{p in P(a)} w_ap exp(-gamma alpha_p (s_ap - Delta_p))
                      + log sum_{n in N(a)} w_an exp( gamma alpha_n (s_an - Delta_n)) )

    ``L_a = 0`` for anchors without a mined positive or negative; the loss averages ``L_a`` over
    the anchors with ``L_a > 0`` (``AvgNonZeroReducer``).

    Weights: a pair's weight multiplies its exponential term inside its log-sum, so weight 0 is
    the same as not mining the pair. Duplicate pairs count once, with their largest weight. Without
    weights the value equals pytorch-metric-learning 2.9's ``CircleLoss`` (except that PML returns 0
    for a batch with at most one pair of each kind).

    Args:
        m: the relaxation margin.
        gamma: the scale factor.
        distance: must be ``CosineSimilarity`` (the optima ``O_p``, ``O_n`` assume similarities in [-1, 1]).
        reducer: default (``None``) ``AvgNonZeroReducer`` semantics as above; any ``losses.reducers``
            reducer sees the ``[B]`` row losses ``L_a`` as one ``"element"`` part named ``"loss"``.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0, distance: BaseDistance | None = None, reducer: BaseReducer | None = None) -> None:
        super().__init__(distance=distance, reducer=reducer)
        self.m = m
        self.gamma = gamma

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def check_distance(self, distance: BaseDistance) -> None:
        if not isinstance(distance, CosineSimilarity):
            raise ValueError(f"CircleLoss needs distance=CosineSimilarity(); got {type(distance).__name__}")

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        rows = self._row_losses(inputs, mined)
        return self.zero_loss(inputs) if rows is None else mean_nonzero(rows, self.zero_loss(inputs)).to(inputs.emb.dtype)

    def tuple_losses(self, inputs: Inputs, mined: Mined | None) -> dict[str, LossPart]:
        """The ``[B]`` row losses ``L_a``: PML's ``"element"`` reduction type."""
        return row_parts(self._row_losses(inputs, mined), inputs.emb)

    def _row_losses(self, inputs: Inputs, mined: Mined | None) -> Tensor | None:
        """``L_a`` for every query row ``[B]`` (work dtype); None without a positive or a negative pair."""
        dtype = work_dtype(inputs.emb.dtype)
        pos_w, neg_w = mined_pair_matrices(inputs, mined, dtype)
        if not any_mined(pos_w) or not any_mined(neg_w):
            return None
        check_disjoint(pos_w, neg_w, type(self).__name__)
        sim = self.distance(inputs.emb, inputs.ref_emb).to(dtype)
        alpha_p = F.relu(1 + self.m - sim.detach())
        alpha_n = F.relu(sim.detach() + self.m)
        lse_p = weighted_logsumexp(-self.gamma * alpha_p * (sim - (1 - self.m)), pos_w)
        lse_n = weighted_logsumexp(self.gamma * alpha_n * (sim - self.m), neg_w)
        valid = is_mined(pos_w).any(dim=1) & is_mined(neg_w).any(dim=1)
        total = torch.where(valid, lse_p + lse_n, torch.zeros_like(lse_p))
        return torch.where(valid, F.softplus(total), torch.zeros_like(total))
