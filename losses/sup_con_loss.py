"""Supervised contrastive loss."""

from __future__ import annotations

import torch
from torch import Tensor

from contracts.distances import BaseDistance, CosineSimilarity
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined
from losses.base_loss import BaseLoss
from losses.pair_matrix import any_mined, check_disjoint, is_mined, mined_pair_matrices, weighted_logsumexp
from losses.reducers import BaseReducer, LossPart, mean_nonzero, row_parts


class SupConLoss(BaseLoss):
    """Supervised contrastive loss, the ``L_out`` form (the mean over positives outside the log).

    Khosla et al., "Supervised Contrastive Learning" (NeurIPS 2020), Eq. 2. For anchor ``a`` with
    mined positives ``P(a)`` and negatives ``N(a)``::

        L_a = -1/|P(a)| * sum_{p in P(a)} w_ap * log( exp(s_ap / t) / Z_a ),
        Z_a = sum_{k in P(a)} exp(s_ak / t) + sum_{n in N(a)} w_an exp(s_an / t)

    ``s`` is the similarity, or minus the distance for a distance. The loss averages ``L_a`` over
    the anchors with ``L_a > 0`` (``AvgNonZeroReducer``); anchors without a positive give 0, and so
    does a batch without any positive or without any negative pair.

    Weights: a positive pair's weight multiplies its log-probability term (``|P(a)|`` stays the
    number of positives with weight > 0; a positive enters ``Z_a`` unweighted so that every term is
    a log-probability <= 0); a negative pair's weight multiplies its exponential in ``Z_a``. Weight 0
    is the same as not mining the pair. Duplicate pairs count once, with their largest weight.
    Without weights the value equals pytorch-metric-learning 2.9's ``SupConLoss`` (except that PML
    returns 0 for a batch with at most one pair of each kind). Memory is ``O(B * M)``.

    Args:
        temperature: the softmax temperature ``t``.
        distance: default ``CosineSimilarity()``.
        reducer: default (``None``) ``AvgNonZeroReducer`` semantics as above; any ``losses.reducers``
            reducer sees the ``[B]`` row losses ``L_a`` as one ``"element"`` part named ``"loss"``.
    """

    def __init__(self, temperature: float = 0.1, distance: BaseDistance | None = None, reducer: BaseReducer | None = None) -> None:
        super().__init__(distance=distance, reducer=reducer)
        if temperature <= 0:
            raise ValueError(f"SupConLoss: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def _logit_scale(self) -> float:
        """Logits are ``s / t``: ``+1/t`` times a similarity, ``-1/t`` times a distance."""
        return (1.0 if self.distance.is_inverted else -1.0) / self.temperature

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
        mat = self.distance(inputs.emb, inputs.ref_emb).to(dtype)
        is_pos = is_mined(pos_w)
        # Z_a: positives unweighted, negatives with their weights
        z_weights = is_pos | neg_w if neg_w.dtype == torch.bool else torch.where(is_pos, 1.0, neg_w)
        log_z = weighted_logsumexp(mat, z_weights, scale=self._logit_scale())
        pos_w = pos_w.to(dtype)
        count = is_pos.sum(dim=1)
        log_z = torch.where(count > 0, log_z, torch.zeros_like(log_z))
        log_prob_sum = (pos_w * mat).sum(dim=1) * self._logit_scale() - pos_w.sum(dim=1) * log_z
        return -log_prob_sum / count.clamp(min=1).to(dtype)
