"""Contrastive (pair) loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from contracts.distances import BaseDistance
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined
from losses.base_loss import BaseLoss
from losses.pair_matrix import any_mined, few_tuples, listed_distances, mined_pair_matrices, mined_pairs
from losses.reducers import BaseReducer, LossPart, mean_nonzero, weighted


class ContrastiveLoss(BaseLoss):
    """Pull positive pairs within ``pos_margin``, push negative pairs beyond ``neg_margin``.

    Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping" (CVPR 2006),
    Eq. 4, in pytorch-metric-learning's two-margin form. For a distance ``d``::

        L_pos(a, p) = [d(a, p) - pos_margin]_+        L_neg(a, n) = [neg_margin - d(a, n)]_+

    and for a similarity ``s`` the signs flip (``[pos_margin - s]_+``, ``[s - neg_margin]_+``).
    The loss is ``mean_nonzero(w+ * L_pos) + mean_nonzero(w- * L_neg)``: each part is averaged
    over its pairs whose weighted loss is > 0 (``AvgNonZeroReducer``) and is 0 when it has none.

    Weights: ``pos_weights`` / ``neg_weights`` (or a triplet's weight, given to both of its pairs)
    multiply each pair's hinge before the average; a pair with weight 0 drops out of the count.
    Without weights the value equals pytorch-metric-learning 2.9's ``ContrastiveLoss``, except that
    a batch with a single positive and a single negative pair gives its loss (PML returns 0 there).

    Args:
        pos_margin: positives closer than this (a distance) cost nothing.
        neg_margin: negatives farther than this cost nothing.
        distance: default ``LpDistance(normalize_embeddings=True)``.
        reducer: default (``None``) ``AvgNonZeroReducer`` semantics as above; any ``losses.reducers``
            reducer sees the parts ``"pos_loss"`` (``"pos_pair"``) and ``"neg_loss"`` (``"neg_pair"``),
            reduced separately and summed, as PML's ``ContrastiveLoss``.

    Synthetic points (``Mined.mix``) join as pairs weighted by their soft label ``w`` and ``1 - w``
    (``BaseLoss.apply_mix``): the Metrix form ``w [d(a, m) - pos_margin]_+ + (1 - w) [neg_margin - d(a, m)]_+``
    (Venkataramanan et al., ICLR 2022).
    """

    accepts_mix = True

    def __init__(
        self,
        pos_margin: float = 0.0,
        neg_margin: float = 1.0,
        distance: BaseDistance | None = None,
        reducer: BaseReducer | None = None,
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        zero = self.zero_loss(inputs)
        if mined is None or mined.has_masks:
            # every pair, or pairs as masks: the hinges over the whole matrix, weighted by the masks
            pos_w, neg_w = mined_pair_matrices(inputs, mined, work_dtype(inputs.emb.dtype))
            if not (any_mined(pos_w) or any_mined(neg_w)):
                return zero
            ap = an = self.distance(inputs.emb, inputs.ref_emb)
        else:
            a1, p, a2, n, pw, nw = mined_pairs(inputs, mined)
            if len(a1) + len(a2) == 0:
                return zero
            if few_tuples(len(a1) + len(a2), inputs):
                ap, an = listed_distances(self.distance, inputs, (a1, p), (a2, n))
            else:
                mat = self.distance(inputs.emb, inputs.ref_emb)
                ap, an = mat[a1, p], mat[a2, n]
            pos_w, neg_w = pw, nw
        work = work_dtype(ap.dtype)
        pos = F.relu(self.distance.margin(ap.to(work), self.pos_margin))
        neg = F.relu(self.distance.margin(self.neg_margin, an.to(work)))
        loss = mean_nonzero(weighted(pos, pos_w), zero) + mean_nonzero(weighted(neg, neg_w), zero)
        return loss.to(inputs.emb.dtype)

    def tuple_losses(self, inputs: Inputs, mined: Mined | None) -> dict[str, LossPart]:
        """One hinge per listed pair (masks listed), weighted: PML's ``"pos_pair"`` and ``"neg_pair"`` parts."""
        a1, p, a2, n, pw, nw = mined_pairs(inputs, mined)
        mat = self.distance(inputs.emb, inputs.ref_emb)
        pos = F.relu(self.distance.margin(mat[a1, p], self.pos_margin))
        neg = F.relu(self.distance.margin(self.neg_margin, mat[a2, n]))
        return {
            "pos_loss": LossPart(weighted(pos, pw), (a1, p), "pos_pair"),
            "neg_loss": LossPart(weighted(neg, nw), (a2, n), "neg_pair"),
        }
