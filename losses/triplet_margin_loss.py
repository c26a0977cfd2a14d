"""Triplet margin loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contracts.distances import BaseDistance
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import check_weights
from contracts.mined import Mined
from contracts.relevance import valid_triplets
from losses.base_loss import BaseLoss
from losses.pair_matrix import any_mined, few_tuples, listed_distances
from losses.reducers import BaseReducer, LossPart, mean_nonzero, weighted


class TripletMarginLoss(BaseLoss):
    """``[d(a, p) - d(a, n) + margin]_+`` averaged over the triplets with a non-zero loss.

    Weinberger & Saul, "Distance Metric Learning for Large Margin Nearest Neighbor Classification"
    (2009), and Schroff et al., "FaceNet" (2015), Eq. 1. With ``smooth_loss=True`` the hinge is
    replaced by ``softplus`` (the soft-margin variant of Hermans et al. 2017, Eq. 4). For a
    similarity the margin term is ``s(a, n) - s(a, p)``. With ``mined=None`` every valid triplet of
    the batch is used. Per-triplet weights (>= 0) multiply each triplet's loss before the average
    over the triplets whose weighted loss is > 0.

    Args:
        margin: the desired gap between the positive and negative distance.
        swap: use ``min(d(a, n), d(p, n))`` as the negative distance (Balntas et al. 2016).
        smooth_loss: softplus instead of the hinge.
        reducer: default (``None``) ``AvgNonZeroReducer`` semantics as above; any ``losses.reducers``
            reducer sees one ``"triplet"`` part named ``"loss"`` (PML's ``TripletMarginLoss``).
    """

    def __init__(
        self,
        margin: float = 0.05,
        swap: bool = False,
        smooth_loss: bool = False,
        distance: BaseDistance | None = None,
        reducer: BaseReducer | None = None,
    ) -> None:
        super().__init__(distance=distance, reducer=reducer)
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        if mined is None:
            mined = valid_triplets(inputs)
        if mined.triplet_mask is not None:
            return self._masked_loss(inputs, *mined.triplet_mask)
        a, p, n, w = mined.as_triplets()
        check_weights(w, "triplet_weights")
        if len(a) == 0:
            return self.zero_loss(inputs)
        if not self.swap and few_tuples(len(a), inputs):
            # few triplets (batch-hard, top-k): distances of the listed rows only, O(T D) not O(B M D)
            ap, an = listed_distances(self.distance, inputs, (a, p), (a, n))
        else:
            mat = self.distance(inputs.emb, inputs.ref_emb)
            if not self.swap and not self.smooth_loss:
                return self._dense_hinge(inputs, mat, a, p, n, w)
            ap, an = mat[a, p], mat[a, n]
        if self.swap:
            pn = self.distance.pairwise(inputs.ref_emb[p], inputs.ref_emb[n])
            an = self.distance.closest(torch.stack([an, pn]), dim=0)[0]
        violation = self.distance.margin(ap, an) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return mean_nonzero(weighted(losses, w), self.zero_loss(inputs))

    def tuple_losses(self, inputs: Inputs, mined: Mined | None) -> dict[str, LossPart]:
        """One loss per listed triplet (dense forms listed), weighted: PML's ``"triplet"`` reduction type."""
        if mined is None:
            mined = valid_triplets(inputs)
        a, p, n, w = mined.as_triplets()
        check_weights(w, "triplet_weights")
        mat = self.distance(inputs.emb, inputs.ref_emb)
        ap, an = mat[a, p], mat[a, n]
        if self.swap:
            pn = self.distance.pairwise(inputs.ref_emb[p], inputs.ref_emb[n])
            an = self.distance.closest(torch.stack([an, pn]), dim=0)[0]
        violation = self.distance.margin(ap, an) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return {"loss": LossPart(weighted(losses, w), (a, p, n), "triplet")}

    def _masked_loss(self, inputs: Inputs, positives: Tensor, mask: Tensor) -> Tensor:
        """The loss of triplets in dense form (``Mined.triplet_mask``) as broadcasts over the distance matrix.

        ``violation[a, k, n] = margin(d(a, positives[a, k]), d(a, n)) + m`` is ``[B, K, M]``, built from
        the ``[B, M]`` matrix by a gather and a broadcast; entries outside ``mask`` weigh 0. Same value
        as the listed triplets, without listing them. The plain hinge takes ``_masked_hinge``.
        """
        if not any_mined(mask):
            return self.zero_loss(inputs)
        mat = self.distance(inputs.emb, inputs.ref_emb)
        mat = mat.to(work_dtype(mat.dtype))
        if not self.swap and not self.smooth_loss:
            return self._masked_hinge(inputs, mat, positives, mask)
        ap = mat.gather(1, positives).unsqueeze(2)  # [B, K, 1]
        an = mat.unsqueeze(1)  # [B, 1, M]
        if self.swap:
            ref_mat = mat if inputs.same_set else self.distance(inputs.ref_emb, inputs.ref_emb).to(mat.dtype)
            pn = ref_mat[positives]  # [B, K, M]: d(p, n) for each anchor's positive slot
            an = torch.maximum(an, pn) if self.distance.is_inverted else torch.minimum(an, pn)
        violation = self.distance.margin(ap, an) + self.margin
        losses = F.softplus(violation) if self.smooth_loss else F.relu(violation)
        return mean_nonzero(weighted(losses, mask), self.zero_loss(inputs)).to(inputs.emb.dtype)

    def _masked_hinge(self, inputs: Inputs, mat: Tensor, positives: Tensor, mask: Tensor) -> Tensor:
        """``_masked_loss`` for the hinge: linear on the active triplets, so reduced to ``[B, K]`` and ``[B, M]`` coefficients.

        With ``A[a, k, n]`` the weight of an active triplet (mined and ``violation > 0``, decided
        without gradient), ``sum A * violation = sum_{a,k} A[a,k,:].sum() * d(a, p_ak) - sum_{a,n}
        A[a,:,n].sum() * d(a, n) + m * sum A`` (signs swapped for a similarity): two reductions of
        ``A`` replace the ``[B, K, M]`` autograd graph.
        """
        with torch.no_grad():
            violation = self.distance.margin(mat.gather(1, positives).unsqueeze(2), mat.unsqueeze(1)).add_(self.margin)
            active = violation > 0
            active &= mask if mask.dtype == torch.bool else mask > 0
            count = int(torch.count_nonzero(active))
            if count and mask.dtype != torch.bool:
                active = active.to(mat.dtype).mul_(mask.to(mat.dtype))
            del violation
        if count == 0:
            return self.zero_loss(inputs)  # outside no_grad: the zero keeps the graph
        with torch.no_grad():
            pos_coeff = active.sum(dim=2, dtype=mat.dtype)  # [B, K]
            neg_coeff = active.sum(dim=1, dtype=mat.dtype)  # [B, M]
            constant = self.margin * float(active.sum(dtype=torch.float64)) if mask.dtype != torch.bool else self.margin * count
        sign = -1.0 if self.distance.is_inverted else 1.0
        total = sign * ((mat.gather(1, positives) * pos_coeff).sum() - (mat * neg_coeff).sum()) + constant
        return (total / count).to(inputs.emb.dtype)

    def _dense_hinge(self, inputs: Inputs, mat: Tensor, a: Tensor, p: Tensor, n: Tensor, w: Tensor | None) -> Tensor:
        """The hinge loss of many triplets as a masked ``[B, M]`` reduction (same value, dense backward).

        Which triplets are active (``violation > 0``) is decided without gradient; on them the hinge
        is linear, ``sum_t w_t (margin(ap_t, an_t) + m) = sum(W * mat) + m * sum_t w_t`` with
        ``W[a, p] += w_t`` / ``W[a, n] -= w_t`` (signs swapped for a similarity), accumulated by
        ``bincount``. The backward pass is then one dense ``[B, M]`` product instead of scattering
        millions of per-triplet gradients into the matrix.
        """
        with torch.no_grad():
            flat = mat.detach().reshape(-1)
            rows = a * mat.shape[1]
            lin_p, lin_n = rows + p, rows + n
            violation = self.distance.margin(flat.index_select(0, lin_p), flat.index_select(0, lin_n)) + self.margin
            weight = (violation > 0).to(mat.dtype)
            if w is not None:
                weight = weight * w.to(mat.dtype)
            count = int((weight > 0).sum())
        if count == 0:
            return self.zero_loss(inputs)  # outside no_grad: the zero keeps the graph
        with torch.no_grad():
            size = mat.numel()
            coeff = torch.bincount(lin_p, weights=weight, minlength=size) - torch.bincount(lin_n, weights=weight, minlength=size)
            work = work_dtype(mat.dtype)
            coeff = coeff.view_as(mat).to(work)
            if self.distance.is_inverted:
                coeff = coeff.neg_()
            constant = self.margin * weight.to(work).sum()
        return (((mat.to(work) * coeff).sum() + constant) / count).to(mat.dtype)
