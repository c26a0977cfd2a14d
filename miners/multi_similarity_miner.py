"""Multi-similarity pair mining."""

from __future__ import annotations

from typing import Optional

from contracts.distances import BaseDistance, CosineSimilarity
from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.relevance import outside_masks
from miners.base_miner import BaseMiner
from miners.masked_reductions import push_outside


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

    The pairs come as dense ``[B, M]`` masks (``Mined.from_masks``): the miner typically keeps a
    large share of all pairs (about 4M at B = 2048), which a list would hold at 16 bytes a pair.

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
        not_pos, not_neg = outside_masks(inputs, mat.dtype)
        eps = self.epsilon
        inverted = self.distance.is_inverted
        # Non-positives pushed to the end where the hardest positive is not searched, so they never
        # pass the positive test below either; likewise for non-negatives. An anchor without
        # positives gets a hardest positive of -/+finfo.max, which no negative passes, and vice
        # versa; so a batch without positive (or negative) pairs yields nothing.
        pos_mat = push_outside(mat, not_pos, largest=not inverted, out=not_pos)
        neg_mat = push_outside(mat, not_neg, largest=inverted, out=not_neg)
        if inverted:
            hardest_pos = pos_mat.amin(dim=1, keepdim=True)
            hardest_neg = neg_mat.amax(dim=1, keepdim=True)
            keep_pos = pos_mat.sub_(eps) < hardest_neg
            keep_neg = neg_mat.add_(eps) > hardest_pos
        else:
            hardest_pos = pos_mat.amax(dim=1, keepdim=True)
            hardest_neg = neg_mat.amin(dim=1, keepdim=True)
            keep_pos = pos_mat.add_(eps) > hardest_neg
            keep_neg = neg_mat.sub_(eps) < hardest_pos
        return Mined.from_masks(keep_pos, keep_neg)
