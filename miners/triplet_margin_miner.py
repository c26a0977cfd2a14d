"""Triplets selected by their margin: all violating, hard, semi-hard or easy."""

from __future__ import annotations

from typing import Optional

import torch

from contracts.distances import BaseDistance
from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.relevance import outside_masks
from miners.base_miner import BaseMiner
from miners.masked_reductions import push_outside

TYPES = ("all", "hard", "semihard", "easy")


class TripletMarginMiner(BaseMiner):
    """Every triplet ``(a, p, n)`` whose margin ``m = D(a, n) - D(a, p)`` falls in a band.

    The margin is ``s(a, p) - s(a, n)`` for a similarity. ``"all"``: ``m <= margin`` (the triplets
    with a non-zero hinge loss, Schroff et al., "FaceNet", 2015, Eq. 1); ``"hard"``: ``m <= margin``
    and ``m <= 0`` (the negative is at least as close as the positive); ``"semihard"``:
    ``0 < m <= margin`` (FaceNet Eq. 4: farther than the positive but inside the margin);
    ``"easy"``: ``m > margin``. Equals pytorch-metric-learning's ``TripletMarginMiner``.

    The band test runs on ``[anchors, K, M]`` blocks (``K``: most positives of an anchor, padded)
    broadcast from the distance matrix, in which non-negatives are pushed out of the band, so the
    list of all triplets is never built. The selected triplets are returned in the dense form
    ``Mined.triplet_mask`` (``[B, K, M]`` bits; millions of semi-hard triplets at B = 2048), or as
    lists when that mask would exceed ``mask_entries``.

    Args:
        margin: the band edge, in the units of the distance.
        type_of_triplets: ``"all"``, ``"hard"``, ``"semihard"`` or ``"easy"``.
        distance: shared with the loss; default ``LpDistance(normalize_embeddings=True)``.
    """

    #: entries of one ``[anchors, K, M]`` block; bounds the miner's temporary memory.
    block_entries: int = 1 << 24
    #: largest ``B * K * M`` returned as a ``TripletMask`` (one byte per entry); beyond it, index lists.
    mask_entries: int = 1 << 28

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", distance: Optional[BaseDistance] = None) -> None:
        super().__init__(distance=distance)
        if type_of_triplets not in TYPES:
            raise ValueError(f"TripletMarginMiner: type_of_triplets={type_of_triplets!r}; expected one of {TYPES}")
        self.margin = margin
        self.type_of_triplets = type_of_triplets

    def mine(self, inputs: Inputs) -> Mined:
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
        not_pos, not_neg = outside_masks(inputs, mat.dtype)
        inverted = self.distance.is_inverted
        # Non-negatives are pushed to the end where their margin leaves the band: +huge for
        # "all"/"hard"/"semihard" (m <= margin fails), -huge for "easy" (m > margin fails).
        # Negatives keep their exact values, so their margins are computed as PML computes them.
        huge_margin = self.type_of_triplets != "easy"
        neg_mat = push_outside(mat, not_neg, largest=inverted == huge_margin, out=not_neg)
        # Each anchor's positives as a padded [B, K] table (K = most positives of any anchor); padded
        # slots get a NaN distance, whose margin is NaN and fails every band test.
        k = int((not_pos < 0.5).sum(dim=1).max()) if mat.numel() else 0  # counted exactly, even in half
        empty = torch.empty(0, dtype=torch.long, device=mat.device)
        if k == 0:
            return Mined.from_triplets(empty, empty, empty)
        is_pos, pos_idx = (1 - not_pos).topk(k, dim=1)
        ap = mat.gather(1, pos_idx).masked_fill_(is_pos < 0.5, float("nan"))
        rows = max(1, self.block_entries // max(1, k * mat.shape[1]))
        as_mask = len(mat) * k * mat.shape[1] <= self.mask_entries
        mask = torch.empty((len(mat), k, mat.shape[1]), dtype=torch.bool, device=mat.device) if as_mask else None
        out_a, out_p, out_n = [], [], []
        for start in range(0, len(mat), rows):  # blocks of anchors bounded by block_entries
            ap_b = ap[start : start + rows].unsqueeze(2)
            an_b = neg_mat[start : start + rows].unsqueeze(1)
            m = (ap_b - an_b) if inverted else (an_b - ap_b)
            keep = self._in_band(m)
            if mask is not None:
                mask[start : start + rows] = keep
                continue
            a, slot, n = torch.where(keep)
            out_a.append(a + start)
            out_p.append(pos_idx[a + start, slot])
            out_n.append(n)
        if mask is not None:
            return Mined.from_triplet_mask(pos_idx, mask)
        return Mined.from_triplets(torch.cat(out_a), torch.cat(out_p), torch.cat(out_n))

    def _in_band(self, m: torch.Tensor) -> torch.Tensor:
        if self.type_of_triplets == "easy":
            return m > self.margin
        keep = m <= self.margin
        if self.type_of_triplets == "hard":
            keep &= m <= 0
        elif self.type_of_triplets == "semihard":
            keep &= m > 0
        return keep
