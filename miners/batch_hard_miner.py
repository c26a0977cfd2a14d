"""Batch-hard mining."""

from __future__ import annotations

import torch

from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.relevance import has_pos_and_neg, outside_masks
from miners.base_miner import BaseMiner
from miners.masked_reductions import closest_largest, extreme_outside


class BatchHardMiner(BaseMiner):
    """For each anchor, its farthest positive and its closest negative: one triplet per anchor.

    Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person Re-Identification" (2017),
    Eq. 5: ``max_p D(a, p)`` and ``min_n D(a, n)`` over the batch. Anchors without a positive or
    without a negative yield no triplet. Ties resolve to the lowest index, as ``torch.max``.
    Works for distances and similarities (farthest = smallest similarity). Equals
    pytorch-metric-learning's ``BatchHardMiner`` (its ``BatchEasyHardMiner`` with hard/hard).
    Cost: one ``B x M`` matrix and two masked row reductions.
    """

    ranking_only = True  # arg-max / arg-min per row

    def mine(self, inputs: Inputs) -> Mined:
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
        not_pos, not_neg = outside_masks(inputs, mat.dtype)
        near_is_large = closest_largest(self.distance)
        _, p, _ = extreme_outside(mat, not_pos, largest=not near_is_large, consume=True, want_any=False)
        _, n, _ = extreme_outside(mat, not_neg, largest=near_is_large, consume=True, want_any=False)
        keep = has_pos_and_neg(inputs)
        a = torch.arange(len(mat), device=mat.device)[keep]
        return Mined.from_triplets(a, p[keep], n[keep])
