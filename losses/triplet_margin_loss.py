"""Triplet margin loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.base_loss import BaseLoss
from losses.pair_matrix import check_weights
from losses.reducers import mean_nonzero, weighted
from miners.mined import Mined
from miners.tuples import Inputs, all_triplets


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
    """

    #: below ``B * M / FEW_TRIPLETS_RATIO`` triplets the distances are computed per listed pair (measured
    #: crossover on CPU at B = 2048, D = 512: row-wise work is memory-bound, the full matrix is a GEMM).
    FEW_TRIPLETS_RATIO = 200

    def __init__(self, margin: float = 0.05, swap: bool = False, smooth_loss: bool = False, distance=None) -> None:
        super().__init__(distance=distance)
        self.margin = margin
        self.swap = swap
        self.smooth_loss = smooth_loss

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        if mined is None:
            mined = all_triplets(inputs.labels, inputs.ref_labels, inputs.same_set)
        a, p, n, w = mined.as_triplets()
        check_weights(w, "triplet_weights")
        if len(a) == 0:
            return self.zero_loss(inputs)
        n_query, n_ref = len(inputs.emb), len(inputs.ref_emb)
        if not self.swap and len(a) * self.FEW_TRIPLETS_RATIO <= n_query * n_ref:
            # few triplets (batch-hard, top-k): distances of the listed rows only, O(T D) not O(B M D)
            ap, an = self._listed_distances(inputs, a, p, n)
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

    def _listed_distances(self, inputs: Inputs, a: Tensor, p: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """``d(a, p)`` and ``d(a, n)`` per triplet, normalising each embedding once (as ``distance.pairwise``)."""
        q = self.distance.maybe_normalize(inputs.emb)
        r = q if inputs.same_set else self.distance.maybe_normalize(inputs.ref_emb)
        every_anchor_once = len(a) == len(q) and bool((a == torch.arange(len(q), device=a.device)).all())
        qa = q if every_anchor_once else q[a]  # batch-hard lists the anchors in order: skip the gather
        ap = self.distance.pairwise_distance(qa, r[p])
        an = self.distance.pairwise_distance(qa, r[n])
        if self.distance.power != 1:
            ap, an = ap**self.distance.power, an**self.distance.power
        return ap, an

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
            work = torch.float32 if mat.dtype in (torch.float16, torch.bfloat16) else mat.dtype
            coeff = coeff.view_as(mat).to(work)
            if self.distance.is_inverted:
                coeff = coeff.neg_()
            constant = self.margin * weight.to(work).sum()
        return (((mat.to(work) * coeff).sum() + constant) / count).to(mat.dtype)
