"""Distance-weighted sampling of negatives."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from contracts.distances import BaseDistance, LpDistance
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs, resolve_inputs
from contracts.mined import Mined
from contracts.relevance import relevance_masks
from miners.base_miner import BaseMiner


class DistanceWeightedMiner(BaseMiner):
    """Random triplets whose negatives are drawn with probability ``~ q(d)^-1`` (uniform in distance).

    Wu, Manmatha, Smola, Krähenbühl, "Sampling Matters in Deep Embedding Learning" (ICCV 2017),
    Sec. 4, Eq. 3-4. Pairwise distances of points spread uniformly on the unit sphere in ``R^n``
    have density ``q(d) ~ d^(n-2) [1 - d^2/4]^((n-3)/2)`` (Eq. 3); sampling a negative with
    probability ``~ q(d)^-1`` (Eq. 4) spreads the sampled distances evenly instead of concentrating
    them near ``sqrt(2)``. As in the paper's and pytorch-metric-learning's implementations,
    distances are clipped below at ``cutoff`` (bounding the weight of very close negatives, the
    paper's ``lambda``) and negatives at ``nonzero_loss_cutoff`` or farther get weight 0 (they give
    no margin loss). Log-weights are shifted by their maximum over the whole matrix before ``exp``,
    as pytorch-metric-learning does, so the probabilities equal its ones.

    Triplets: each anchor ``a`` with at least one positive, one negative and a non-zero weight row
    gets ``k_a`` triplets, where ``k_a`` is the number of reference points sharing its label
    (itself included when the reference set is the batch); positives are uniform over ``a``'s
    positives, negatives follow the weights, both with replacement (pytorch-metric-learning's
    ``get_random_triplet_indices``). ``negative_probabilities`` exposes the ``[B, M]`` distribution.

    Args:
        cutoff: lower clip of the distance.
        nonzero_loss_cutoff: negatives at this distance or beyond are never sampled.
        distance: must be ``LpDistance(p=2, power=1, normalize_embeddings=True)`` (the default):
            ``q(d)`` is the distance density on the unit sphere.
    """

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, distance: Optional[BaseDistance] = None) -> None:
        super().__init__(distance=distance)
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)

    def default_distance(self) -> BaseDistance:
        return LpDistance(normalize_embeddings=True)

    def check_distance(self, distance: BaseDistance) -> None:
        d = distance
        if not (type(d) is LpDistance and d.p == 2 and d.power == 1 and d.normalize_embeddings):
            raise ValueError(f"DistanceWeightedMiner needs LpDistance(p=2, power=1, normalize_embeddings=True); got {d!r}")

    def negative_probabilities(
        self,
        emb: Tensor,
        labels: Optional[Tensor] = None,
        ref_emb: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
        *,
        pos_mask: Optional[Tensor] = None,
        ignore_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``[B, M]``: row ``a`` is the distribution from which ``a``'s negatives are drawn.

        ``emb: [B, D]``, ``labels: [B]``, optional ``ref_emb: [M, D]``, ``ref_labels: [M]``. Rows with no
        admissible negative are NaN (0/0), as in pytorch-metric-learning; the miner skips them.
        ``pos_mask`` / ``ignore_mask`` as for ``forward``.
        """
        inputs = resolve_inputs(
            emb, labels, ref_emb, ref_labels, who=type(self).__name__, pos_mask=pos_mask, ignore_mask=ignore_mask
        )
        with torch.no_grad():
            return self._probabilities(inputs)

    def _probabilities(self, inputs: Inputs, neg: Optional[Tensor] = None) -> Tensor:
        """``neg``: the bool ``[B, M]`` negatives (``relevance_masks``), when the caller has them already."""
        dim = float(inputs.emb.shape[1])
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb).clamp(min=self.cutoff)
        log_w = (2.0 - dim) * torch.log(mat) - ((dim - 3) / 2) * torch.log(1.0 - 0.25 * mat**2.0)
        invalid = ~torch.isfinite(log_w)
        other = (relevance_masks(inputs)[1] if neg is None else neg).to(mat.dtype)
        log_w = log_w * other  # same-class entries become 0 (NaN where infinite), as in PML
        finite = log_w[~invalid]
        shift = finite.max() if finite.numel() else torch.zeros((), dtype=mat.dtype, device=mat.device)
        w = torch.exp(log_w - shift) * other * (mat < self.nonzero_loss_cutoff).to(mat.dtype)
        w = w.masked_fill(invalid, 0)
        return w / w.sum(dim=1, keepdim=True)

    def mine(self, inputs: Inputs) -> Mined:
        pos, neg = relevance_masks(inputs)
        probs = self._probabilities(inputs, neg)
        k = pos.sum(dim=1) + int(inputs.same_set)  # reference points with the anchor's label
        row_sum = probs.sum(dim=1)
        ok = pos.any(dim=1) & neg.any(dim=1) & (row_sum > 0)  # NaN rows compare False
        anchors = torch.where(ok)[0]
        if len(anchors) == 0:
            empty = torch.empty(0, dtype=torch.long, device=probs.device)
            return Mined.from_triplets(empty, empty, empty)
        k_max = int(k[anchors].max())
        sample_dtype = work_dtype(probs.dtype)
        p = torch.multinomial(pos[anchors].to(sample_dtype), k_max, replacement=True)
        n = torch.multinomial(probs[anchors].to(sample_dtype), k_max, replacement=True)
        take = torch.arange(k_max, device=probs.device).unsqueeze(0) < k[anchors].unsqueeze(1)
        a = anchors.unsqueeze(1).expand(-1, k_max)
        return Mined.from_triplets(a[take], p[take], n[take])
