"""Pairs that violate a positive or a negative margin."""

from __future__ import annotations

from typing import Optional

import torch

from contracts.distances import BaseDistance
from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.relevance import relevance_masks
from miners.base_miner import BaseMiner


class PairMarginMiner(BaseMiner):
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than ``neg_margin``.

    The pairs with a non-zero contrastive loss (Hadsell, Chopra, LeCun, "Dimensionality Reduction by
    Learning an Invariant Mapping", CVPR 2006, Eq. 4, with the positive margin of the double-margin
    form): under a distance ``D_ap > pos_margin`` and ``D_an < neg_margin``; under a similarity
    ``S_ap < pos_margin`` and ``S_an > neg_margin``. Equals pytorch-metric-learning's
    ``PairMarginMiner``.

    Args:
        pos_margin / neg_margin: thresholds in the units of the distance.
        distance: shared with the loss; default ``LpDistance(normalize_embeddings=True)``.
    """

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, distance: Optional[BaseDistance] = None) -> None:
        super().__init__(distance=distance)
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    def mine(self, inputs: Inputs) -> Mined:
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
        if self.distance.is_inverted:
            past_pos, past_neg = mat < self.pos_margin, mat > self.neg_margin
        else:
            past_pos, past_neg = mat > self.pos_margin, mat < self.neg_margin
        if inputs.pos_mask is not None:  # relevance as masks (pairs may be neither, so no ~pos shortcut)
            pos, neg = relevance_masks(inputs)
            rows, cols = torch.where((pos & past_pos) | (neg & past_neg))
            is_pos = pos[rows, cols]
            return Mined.from_pairs(rows[is_pos], cols[is_pos], rows[~is_pos], cols[~is_pos])
        same = inputs.labels.unsqueeze(1) == inputs.ref_labels.unsqueeze(0)
        # One listing of both kinds (a B x M nonzero is the miner's costliest step after the matrix),
        # split afterwards; each kind keeps torch.where's row-major order.
        rows, cols = torch.where((same & past_pos) | (past_neg & ~same))
        is_pos = same[rows, cols]
        if inputs.same_set:
            keep = ~is_pos | (rows != cols)  # a row is not its own positive
            rows, cols, is_pos = rows[keep], cols[keep], is_pos[keep]
        return Mined.from_pairs(rows[is_pos], cols[is_pos], rows[~is_pos], cols[~is_pos])
