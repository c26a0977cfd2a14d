"""Batch easy/semi-hard/hard mining of one positive and one negative per anchor."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from contracts.distances import BaseDistance
from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.relevance import relevance_masks
from miners.base_miner import BaseMiner
from miners.masked_reductions import closest_largest, masked_extreme

STRATEGIES = ("hard", "semihard", "easy", "all")


class BatchEasyHardMiner(BaseMiner):
    """Per anchor, one positive and one negative chosen by a strategy each, or all of them.

    Generalises batch-hard mining (Hermans et al., "In Defense of the Triplet Loss for Person
    Re-Identification", 2017, Eq. 5) with the easy-positive choice of Xuan, Stylianou, Pless,
    "Improved Embeddings with Easy Positive Triplet Mining" (WACV 2020, Sec. 3: the closest
    positive) and semi-hard choices in the sense of Schroff et al., "FaceNet" (2015, Eq. 4).

    Positive strategies: ``"hard"`` the farthest positive, ``"easy"`` the closest, ``"semihard"``
    the farthest positive that is still strictly closer than the chosen negative, ``"all"`` every
    positive pair. Negative strategies: ``"hard"`` the closest negative, ``"easy"`` the farthest,
    ``"semihard"`` the closest negative strictly farther than the chosen positive, ``"all"``.
    ``allowed_pos_range`` / ``allowed_neg_range`` (``(low, high)``, inclusive, in the units of the
    distance) restrict the candidates before choosing. An anchor keeps its pair only if both of its
    choices exist; with ``"all"`` on one side the other side's pairs are returned for every anchor
    that has a choice. Ties go to the lowest index. The output is pairs ``(a, p)``, ``(a, n)``,
    exactly as pytorch-metric-learning's ``BatchEasyHardMiner`` (defaults ``easy``/``semihard``).

    Args:
        pos_strategy / neg_strategy: one of ``"hard"``, ``"semihard"``, ``"easy"``, ``"all"``; not
            both ``"semihard"``, and ``"semihard"`` not with ``"all"``.
        allowed_pos_range / allowed_neg_range: optional inclusive ``(low, high)`` value ranges.
        distance: shared with the loss; default ``LpDistance(normalize_embeddings=True)``.
    """

    HARD, SEMIHARD, EASY, ALL = STRATEGIES

    def __init__(
        self,
        pos_strategy: str = "easy",
        neg_strategy: str = "semihard",
        allowed_pos_range: Optional[Sequence[float]] = None,
        allowed_neg_range: Optional[Sequence[float]] = None,
        distance: Optional[BaseDistance] = None,
    ) -> None:
        super().__init__(distance=distance)
        for name, value in (("pos_strategy", pos_strategy), ("neg_strategy", neg_strategy)):
            if value not in STRATEGIES:
                raise ValueError(f"BatchEasyHardMiner: {name}={value!r}; expected one of {STRATEGIES}")
        if pos_strategy == neg_strategy == self.SEMIHARD:
            raise ValueError("BatchEasyHardMiner: pos_strategy and neg_strategy cannot both be 'semihard'")
        if {pos_strategy, neg_strategy} == {self.SEMIHARD, self.ALL}:
            raise ValueError("BatchEasyHardMiner: 'semihard' needs a single choice on the other side, not 'all'")
        for name, rng in (("allowed_pos_range", allowed_pos_range), ("allowed_neg_range", allowed_neg_range)):
            if rng is not None and (len(rng) != 2 or rng[0] > rng[1]):
                raise ValueError(f"BatchEasyHardMiner: {name}={rng!r}; expected (low, high) with low <= high")
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.allowed_pos_range = None if allowed_pos_range is None else tuple(allowed_pos_range)
        self.allowed_neg_range = None if allowed_neg_range is None else tuple(allowed_neg_range)

    @property
    def ranking_only(self) -> bool:  # choices by comparison, unless value ranges are given
        return self.allowed_pos_range is None and self.allowed_neg_range is None

    def mine(self, inputs: Inputs) -> Mined:
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
        pos, neg = relevance_masks(inputs)
        pick_pos = self.pos_strategy != self.ALL
        pick_neg = self.neg_strategy != self.ALL
        if self.pos_strategy == self.SEMIHARD:
            n_val, n, has_n = self._choose(mat, neg, self._neg_largest(), self.allowed_neg_range)
            _, p, has_p = self._choose(mat, pos, self._pos_largest(), self.allowed_pos_range, n_val)
        elif self.neg_strategy == self.SEMIHARD:
            p_val, p, has_p = self._choose(mat, pos, self._pos_largest(), self.allowed_pos_range)
            _, n, has_n = self._choose(mat, neg, self._neg_largest(), self.allowed_neg_range, p_val)
        else:
            if pick_pos:
                _, p, has_p = self._choose(mat, pos, self._pos_largest(), self.allowed_pos_range)
            if pick_neg:
                _, n, has_n = self._choose(mat, neg, self._neg_largest(), self.allowed_neg_range)
        rows = torch.arange(len(mat), device=mat.device)
        if pick_pos and pick_neg:
            keep = has_p & has_n
            return Mined.from_pairs(rows[keep], p[keep], rows[keep], n[keep])
        a1, p_all = torch.where(pos) if not pick_pos else (rows[has_p], p[has_p])
        a2, n_all = torch.where(neg) if not pick_neg else (rows[has_n], n[has_n])
        return Mined.from_pairs(a1, p_all, a2, n_all)

    def _pos_largest(self) -> bool:
        """Hard and semihard positives are the farthest; easy ones the closest."""
        closest_is_large = closest_largest(self.distance)
        return closest_is_large if self.pos_strategy == self.EASY else not closest_is_large

    def _neg_largest(self) -> bool:
        """Hard and semihard negatives are the closest; easy ones the farthest."""
        closest_is_large = closest_largest(self.distance)
        return not closest_is_large if self.neg_strategy == self.EASY else closest_is_large

    @staticmethod
    def _choose(
        mat: Tensor,
        keep: Tensor,
        largest: bool,
        allowed: Optional[tuple[float, float]],
        semihard_thresholds: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Row-wise extreme of the kept entries; a semi-hard threshold keeps only entries on its far side.

        Searching for a maximum, the entries kept are those strictly below the threshold (a
        positive closer than its negative under a distance); searching for a minimum, strictly above.
        """
        if semihard_thresholds is not None:
            t = semihard_thresholds.unsqueeze(1)
            keep = keep & ((mat < t) if largest else (mat > t))
        if allowed is not None:
            keep = keep & (mat >= allowed[0]) & (mat <= allowed[1])
        return masked_extreme(mat, keep, largest)
