"""The k hardest in-batch negatives of every anchor (NGAME's in-batch negative mining)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from contracts.distances import BaseDistance
from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.relevance import relevance_masks
from miners.base_miner import BaseMiner
from miners.masked_reductions import closest_largest, masked_extreme, push_outside


class HardNegativeTopKMiner(BaseMiner):
    """Every positive pair, and for every anchor its ``k`` closest negatives in the reference set.

    Dahiya et al., "NGAME: Negative Mining-aware Mini-batching for Extreme Classification" (WSDM
    2023): inside a mini-batch, each query is trained against its hardest in-batch negatives (the
    ``k`` highest-scoring documents of other labels) with a triplet loss; NGAME makes those
    negatives hard by building batches from clusters (the sampler), and this miner is the in-batch
    selection. ``Mined`` holds all positive pairs ``(a, p)`` and the selected negative pairs ``(a, n)``,
    so a triplet loss gets ``(a, p, n)`` for every positive times each of the ``k`` negatives.

    ``margin`` (None: off) keeps only negatives that are within ``margin`` of the anchor's farthest
    positive: ``D(a, n) < max_p D(a, p) + margin`` for a distance, ``S(a, n) > min_p S(a, p) - margin``
    for a similarity. These are exactly the negatives that give a non-zero triplet hinge
    ``[D(a, p) - D(a, n) + margin]_+`` with at least one positive of ``a``; an anchor without a
    positive then keeps no negative. The top-``k`` is taken among the negatives that pass.
    Rows with fewer than ``k`` candidates keep all of them. Ties at the ``k``-th place go to the
    lowest reference index, so the result is deterministic.

    Args:
        k: negatives per anchor (at least 1).
        margin: optional filter, in the units of the distance (see above).
        distance: shared with the loss; default ``LpDistance(normalize_embeddings=True)``.
    """

    def __init__(self, k: int = 10, margin: Optional[float] = None, distance: Optional[BaseDistance] = None) -> None:
        super().__init__(distance=distance)
        if int(k) != k or k < 1:
            raise ValueError(f"HardNegativeTopKMiner: k={k!r}; expected a positive integer")
        self.k = int(k)
        self.margin = margin

    @property
    def ranking_only(self) -> bool:  # top-k per row, unless the margin filter thresholds values
        return self.margin is None

    def mine(self, inputs: Inputs) -> Mined:
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
        pos, neg = relevance_masks(inputs)
        near_is_large = closest_largest(self.distance)
        candidates = neg
        if self.margin is not None:
            far_pos, _, _ = masked_extreme(mat, pos, largest=not near_is_large)
            bound = far_pos.unsqueeze(1)
            candidates = neg & ((mat > bound - self.margin) if near_is_large else (mat < bound + self.margin))
        a2, n = torch.where(self._top_k(mat, candidates, near_is_large))
        a1, p = torch.where(pos)
        return Mined.from_pairs(a1, p, a2, n)

    def _top_k(self, mat: Tensor, candidates: Tensor, near_is_large: bool) -> Tensor:
        """``[B, M]`` bool: the ``k`` closest candidates of each row, lowest index first among ties."""
        k = min(self.k, mat.shape[1])
        if k == 0:
            return candidates
        pushed = push_outside(mat, ~candidates, largest=near_is_large)
        kth = pushed.topk(k, dim=1, largest=near_is_large).values[:, -1:]
        closer = (pushed > kth) if near_is_large else (pushed < kth)
        tied = pushed == kth
        room = k - closer.sum(dim=1, keepdim=True)
        chosen = closer | tied
        overflow = torch.where((tied.sum(dim=1, keepdim=True) > room).squeeze(1))[0]
        if len(overflow):  # more ties at the k-th value than places: keep the lowest indices
            rank = tied[overflow].cumsum(dim=1)
            chosen[overflow] = closer[overflow] | (tied[overflow] & (rank <= room[overflow]))
        return candidates & chosen
