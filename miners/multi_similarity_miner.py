"""Multi-similarity pair mining."""

from __future__ import annotations

from typing import Optional

import torch

from losses.distances import BaseDistance, CosineSimilarity
from miners.base_miner import BaseMiner
from miners.masked_reductions import outside_masks, push_outside
from miners.mined import Mined
from miners.tuples import Inputs


class MultiSimilarityMiner(BaseMiner):
    """Pairs that are informative relative to the hardest pair of the other kind (pair mining of MS).

    Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning"
    (CVPR 2019), Sec. 5.1 "Pair mining" (its two mining inequalities): with similarities ``S``, a
    negative pair ``(a, n)`` is kept if
    ``S_an + epsilon > min_p S_ap`` and a positive pair ``(a, p)`` if ``S_ap - epsilon < max_n S_an``.
    For a distance the inequalities flip (``D_an - epsilon < max_p D_ap``, ``D_ap + epsilon >
    min_n D_an``). An anchor without positives keeps no negative and vice versa; a batch with no
    positive pair or no negative pair at all yields nothing. Equals pytorch-metric-learning's
    ``MultiSimilarityMiner``, computed with two masked row reductions instead of two full row sorts.

    Args:
        epsilon: the slack of the two inequalities, in the units of the distance.
        distance: shared with the loss; default ``CosineSimilarity()``.
    """

    def __init__(self, epsilon: float = 0.1, distance: Optional[BaseDistance] = None) -> None:
        super().__init__(distance=distance)
        self.epsilon = epsilon

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def mine(self, inputs: Inputs) -> Mined:
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
        not_pos, not_neg = outside_masks(inputs.labels, inputs.ref_labels, inputs.same_set, mat.dtype)
        if not_pos.numel() == 0 or float(not_pos.amin()) > 0.5 or float(not_neg.amin()) > 0.5:
            empty = torch.empty(0, dtype=torch.long, device=mat.device)
            return Mined.from_pairs(empty, empty, empty, empty)
        eps = self.epsilon
        inverted = self.distance.is_inverted
        # Positives pushed to the end where the hardest positive is not searched (non-positives never
        # pass the tests below either, since they sit at -/+finfo.max); likewise for negatives.
        pos_mat = push_outside(mat, not_pos, largest=not inverted, out=not_pos)
        neg_mat = push_outside(mat, not_neg, largest=inverted, out=not_neg)
        if inverted:
            hardest_pos = pos_mat.amin(dim=1, keepdim=True)
            hardest_neg = neg_mat.amax(dim=1, keepdim=True)
            a1, p = torch.where(pos_mat - eps < hardest_neg)
            a2, n = torch.where(neg_mat + eps > hardest_pos)
        else:
            hardest_pos = pos_mat.amax(dim=1, keepdim=True)
            hardest_neg = neg_mat.amin(dim=1, keepdim=True)
            a1, p = torch.where(pos_mat + eps > hardest_neg)
            a2, n = torch.where(neg_mat - eps < hardest_pos)
        return Mined.from_pairs(a1, p, a2, n)
