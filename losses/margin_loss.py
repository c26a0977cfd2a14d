"""Margin-based loss with a learnable boundary ``beta``."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.arguments import is_int_at_least
from contracts.distances import BaseDistance
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined, check_weights
from contracts.relevance import relevance_masks
from losses.base_loss import BaseLoss
from losses.pair_matrix import mined_pairs


class _TripletPairs(NamedTuple):
    """A multiset of triplets, stored as the pairs it is made of.

    Pair ``i`` stands for every triplet it belongs to: ``weight[i]`` is the sum of those triplets'
    weights and ``count[i]`` how many of them have a weight > 0. ``anchor_weight[a]`` sums the weights
    of the triplets anchored at ``a`` (the regulariser's share).
    """

    a1: Tensor
    p: Tensor
    pos_weight: Tensor
    pos_count: Tensor
    a2: Tensor
    n: Tensor
    neg_weight: Tensor
    neg_count: Tensor
    anchor_weight: Tensor


class MarginLoss(BaseLoss):
    """Pull positives inside ``beta - margin`` and push negatives beyond ``beta + margin``.

    Wu, Manmatha, Smola, Krähenbühl, "Sampling Matters in Deep Embedding Learning" (ICCV 2017),
    Eq. 4 with the learnable boundary of Eq. 5. For a distance ``d`` and each triplet ``(a, p, n)``::

        l_pos = [margin + d(a, p) - beta_a]_+        l_neg = [margin + beta_a - d(a, n)]_+

    (``l_margin(i, j) = (alpha + y_ij (D_ij - beta))_+`` with ``alpha = margin``; for a similarity the
    signs flip). ``beta_a`` is one shared ``beta`` or, with ``num_classes``, the boundary of the
    anchor's class (Eq. 5's ``beta^(0) + beta^(class)_c`` as one number per class). The loss is

        L = (sum_t w_t (l_pos + l_neg) + R) / (number of non-zero l_pos and l_neg over the triplets)

    and 0 when that number is 0 (pytorch-metric-learning's ``DivisorReducer``). ``R`` is the
    ``nu (beta^(0) + beta_c)`` regulariser of Eq. 5, only when ``learn_beta``: with one ``beta`` it is
    ``nu * beta`` added once (not divided), per class it is ``nu * sum_t w_t beta_a`` (divided). The
    paper writes the loss over pairs; like PML, every pair enters through the triplets it is part of.

    Tuples: ``mined=None`` means every valid triplet (``triplets_per_anchor="all"``) or, for an int
    ``k``, ``k`` random triplets per anchor with a positive and a negative, positive and negative
    drawn uniformly with replacement (torch's global RNG; PML's ``get_random_triplet_indices``).
    Mined triplets are used as given; mined pairs stand for PML's ``convert_to_triplets`` join
    (every positive pair with every negative pair of the same anchor), evaluated per pair without
    listing the ``O(P N / B)`` triplets. ``triplets_per_anchor`` applies only to ``mined=None``.

    Weights: a triplet's weight (for joined pairs, the product of its two pair weights) multiplies
    both its pair losses and its share of ``R``; a triplet of weight 0 counts as absent. Without
    weights the value equals pytorch-metric-learning 2.9's ``MarginLoss`` with the same arguments.

    ``beta`` is an ``nn.Parameter`` when ``learn_beta`` (scalar, or ``[num_classes]``), so the
    LightningModule puts it in the loss's own optimizer group (``loss_lr``); otherwise a buffer.

    Args:
        margin: ``alpha``, half the width of the band around ``beta`` that costs nothing.
        nu: weight of the ``beta`` regulariser (used only with ``learn_beta``).
        beta: initial boundary ``beta^(0)``.
        triplets_per_anchor: ``"all"`` or the number of random triplets per anchor when ``mined=None``.
        learn_beta: make ``beta`` a learnable parameter.
        num_classes: one ``beta`` per class; labels must then be in ``[0, num_classes)``. As in PML,
            ``num_classes=1`` is the same as one shared ``beta``.
        distance: default ``LpDistance(normalize_embeddings=True)``.
    """

    def __init__(
        self,
        margin: float = 0.2,
        nu: float = 0.0,
        beta: float = 1.2,
        triplets_per_anchor: int | Literal["all"] = "all",
        learn_beta: bool = False,
        num_classes: int | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        if triplets_per_anchor != "all" and not is_int_at_least(triplets_per_anchor, 1):
            raise ValueError(f"MarginLoss: triplets_per_anchor must be 'all' or an int >= 1, got {triplets_per_anchor!r}")
        if num_classes is not None and not is_int_at_least(num_classes, 1):
            raise ValueError(f"MarginLoss: num_classes must be None or an int >= 1, got {num_classes!r}")
        self.margin = margin
        self.nu = nu
        self.triplets_per_anchor = triplets_per_anchor
        self.learn_beta = learn_beta
        self.num_classes = num_classes
        initial = torch.full(() if num_classes is None else (num_classes,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(initial)
        else:
            self.register_buffer("beta", initial)

    @property
    def per_class(self) -> bool:
        return self.beta.numel() > 1

    @property
    def needs_class_labels(self) -> str | None:  # BaseLoss: refuses pos_mask without labels
        return "num_classes gives one beta per class, indexed by the labels; use num_classes=None for a shared beta" if self.per_class else None

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        self._check_labels(inputs.labels)
        tp = self._triplet_pairs(inputs, mined)
        zero = self.zero_loss(inputs)
        if self.learn_beta:
            zero = zero + self.beta.sum() * 0  # beta gets a zero gradient, not None
        if tp is None:
            return zero.to(inputs.emb.dtype)
        mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
        dtype = work_dtype(mat.dtype)
        mat = mat.to(dtype)
        beta = self.beta.to(dtype)
        beta_rows = beta[inputs.labels] if self.per_class else beta.reshape(())
        beta_p = beta_rows[tp.a1] if self.per_class else beta_rows
        beta_n = beta_rows[tp.a2] if self.per_class else beta_rows
        pos = F.relu(self.distance.margin(mat[tp.a1, tp.p], beta_p) + self.margin)
        neg = F.relu(self.distance.margin(beta_n, mat[tp.a2, tp.n]) + self.margin)
        with torch.no_grad():
            divisor = int(tp.pos_count[pos > 0].sum()) + int(tp.neg_count[neg > 0].sum())
        loss = zero.to(dtype)
        if divisor > 0:
            loss = ((tp.pos_weight.to(dtype) * pos).sum() + (tp.neg_weight.to(dtype) * neg).sum()) / divisor
        if self.learn_beta:
            if not self.per_class:
                loss = loss + self.nu * beta.reshape(())
            elif divisor > 0:
                loss = loss + self.nu * (tp.anchor_weight.to(dtype) * beta_rows).sum() / divisor
        return loss.to(inputs.emb.dtype)

    def _check_labels(self, labels: Tensor) -> None:
        if not self.per_class or len(labels) == 0:
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"MarginLoss: labels index the per-class beta, so they must be in [0, num_classes={self.num_classes}); "
                f"got range [{low}, {high}]. Set num_classes to the number of training classes, or None for one shared beta"
            )

    def _triplet_pairs(self, inputs: Inputs, mined: Mined | None) -> _TripletPairs | None:
        """The triplets to sum over, as pairs with multiplicities; ``None`` when there is none."""
        if mined is None and self.triplets_per_anchor != "all":
            mined = self._random_triplets(inputs)
        if mined is not None and mined.has_triplets:
            return self._from_triplets(mined, len(inputs.emb))
        return self._from_pairs(inputs, mined)

    @staticmethod
    def _from_triplets(mined: Mined, n_query: int) -> _TripletPairs | None:
        a, p, n, w = mined.as_triplets()
        check_weights(w, "triplet_weights")
        if w is None:
            w = torch.ones(len(a), device=a.device)
        live = w > 0
        if not bool(live.any()):
            return None
        anchor_weight = torch.zeros(n_query, dtype=w.dtype, device=a.device).index_add_(0, a, w)
        count = live.long()
        return _TripletPairs(a, p, w, count, a, n, w, count, anchor_weight)

    @staticmethod
    def _from_pairs(inputs: Inputs, mined: Mined | None) -> _TripletPairs | None:
        # Triplet (i, j) joins positive pair i and negative pair j of one anchor and has weight
        # pw_i * nw_j, so pair i's total weight is pw_i times the negative weight at its anchor.
        a1, p, a2, n, pw, nw = mined_pairs(inputs, mined)
        b, device = len(inputs.emb), a1.device
        pw = torch.ones(len(a1), device=device) if pw is None else pw.to(device)
        nw = torch.ones(len(a2), device=device) if nw is None else nw.to(device)
        pos_live, neg_live = pw > 0, nw > 0
        pos_sum = torch.zeros(b, dtype=pw.dtype, device=device).index_add_(0, a1, pw)
        neg_sum = torch.zeros(b, dtype=nw.dtype, device=device).index_add_(0, a2, nw)
        pos_num = torch.bincount(a1[pos_live], minlength=b)
        neg_num = torch.bincount(a2[neg_live], minlength=b)
        if not bool((pos_num * neg_num).any()):
            return None
        return _TripletPairs(
            a1, p, pw * neg_sum[a1].to(pw.dtype), pos_live.long() * neg_num[a1],
            a2, n, nw * pos_sum[a2].to(nw.dtype), neg_live.long() * pos_num[a2],
            pos_sum * neg_sum.to(pos_sum.dtype),
        )

    def _random_triplets(self, inputs: Inputs) -> Mined:
        """``triplets_per_anchor`` random triplets for every anchor that has a positive and a negative."""
        pos, neg = relevance_masks(inputs)
        anchors = torch.where(pos.any(dim=1) & neg.any(dim=1))[0]
        k = self.triplets_per_anchor
        if len(anchors) == 0:
            empty = torch.empty(0, dtype=torch.long, device=anchors.device)
            return Mined.from_triplets(empty, empty, empty)
        p = torch.multinomial(pos[anchors].float(), k, replacement=True)
        n = torch.multinomial(neg[anchors].float(), k, replacement=True)
        a = anchors.unsqueeze(1).expand(-1, k)
        return Mined.from_triplets(a.reshape(-1), p.reshape(-1), n.reshape(-1))
