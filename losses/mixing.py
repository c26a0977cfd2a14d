"""The one shared helper that turns a ``Mined.mix`` spec into something a loss already knows how to use.

Synthetic points (MoCHi's hard negatives, Metrix's mixed examples) carry a soft label: how much each
counts as a positive of its anchor. A pair-based loss that multiplies each pair's term by a
per-tuple weight (contrastive, multi-similarity, InfoNCE) needs no mixing code of its own:
``append_mix_pairs`` adds the points to the reference set and lists each one as a positive pair
weighted by its soft label and as a negative pair weighted by one minus it. A loss over classes
(Proxy-Anchor) takes the points as extra rows with ``soft_class_targets`` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.mix_spec import MixSpec


def append_mix_pairs(inputs: Inputs, mined: Mined) -> tuple[Inputs, Mined]:
    """Add the synthetic points of ``mined.mix`` to the reference set as soft positive/negative pairs.

    Each point ``m`` with anchor ``a`` and soft label ``w = pos_weight[m]`` becomes a positive pair
    ``(a, m)`` with weight ``w`` and a negative pair ``(a, m)`` with weight ``1 - w`` (a pair whose
    weight is 0 is left out). For a loss of the generic form of Venkataramanan et al., "It Takes Two
    to Tango: Mixup for Deep Metric Learning" (ICLR 2022), Sec. 3, ``l(a) = tau(sigma+(a), sigma-(a))``
    with ``sigma+(a) = sum_p rho+(s(a, p))`` and ``sigma-(a) = sum_n rho-(s(a, n))``, weights that
    multiply each pair's term give the paper's label interpolation (its mixed loss)::

        sigma+~(a) = sum_m w_m rho+(s(a, m))        sigma-~(a) = sum_m (1 - w_m) rho-(s(a, m))

    With ``w = 0`` the points are extra negatives of their anchor: MoCHi's synthetic negatives
    appended to the InfoNCE denominator (Kalantidis et al., "Hard Negative Mixing for Contrastive
    Learning", NeurIPS 2020: MoCo's loss with the logits of the synthetic features added).

    Each point is appended once per role (a positive copy, then a negative copy), so a loss that
    requires every pair to be either positive or negative (multi-similarity) accepts it. The
    existing tuples of ``mined`` are kept, as pairs. Positive copies carry their anchor's label,
    negative copies a fresh label no other row has; with relevance masks, a positive copy is a
    positive of its anchor only (neither for the other rows) and a negative copy a negative of every
    row. Points carry gradient unless the spec says ``detach``.

    Returns the new inputs (never ``same_set``: the reference set is ``ref_emb`` plus the copies)
    and a ``Mined`` of pairs with weights and no ``mix``.
    """
    spec = mined.mix
    if spec is None:
        return inputs, mined
    points = spec.materialize(inputs.emb, None if inputs.same_set else inputs.ref_emb).to(inputs.emb.dtype)
    w = spec.pos_weight.to(device=points.device, dtype=torch.float64)
    as_pos = torch.nonzero(w > 0).flatten()
    as_neg = torch.nonzero(w < 1).flatten()
    n_ref, n_pos = len(inputs.ref_emb), len(as_pos)
    ref_emb = torch.cat([inputs.ref_emb, points[as_pos], points[as_neg]])
    ref_labels = None
    if inputs.labels is not None:
        known = torch.cat([inputs.labels, inputs.ref_labels.to(inputs.labels.device)])
        fresh = int(known.max()) + 1 if len(known) else 0
        new_labels = [inputs.labels[spec.anchors[as_pos]], fresh + torch.arange(len(as_neg), device=known.device)]
        ref_labels = torch.cat([inputs.ref_labels.to(known.device), *new_labels])
    pos_mask = neg_mask = None
    if inputs.pos_mask is not None:
        b = len(inputs.emb)
        rows = torch.arange(b, device=inputs.pos_mask.device).unsqueeze(1)
        copy_pos = rows == spec.anchors[as_pos].to(rows.device).unsqueeze(0)  # [B, n_pos]: its anchor only
        none = torch.zeros_like(copy_pos)
        every = torch.ones((b, len(as_neg)), dtype=torch.bool, device=rows.device)
        pos_mask = torch.cat([inputs.pos_mask, copy_pos, ~every], dim=1)
        neg_mask = torch.cat([inputs.neg_mask, none, every], dim=1)

    a1, p, a2, n, pw, nw = mined.as_pairs()
    device = spec.anchors.device
    pw = torch.cat([_ones_if_none(pw, len(a1), w), w[as_pos]])
    nw = torch.cat([_ones_if_none(nw, len(a2), w), 1 - w[as_neg]])
    a1 = torch.cat([a1.to(device), spec.anchors[as_pos]])
    p = torch.cat([p.to(device), n_ref + torch.arange(n_pos, device=device)])
    a2 = torch.cat([a2.to(device), spec.anchors[as_neg]])
    n = torch.cat([n.to(device), n_ref + n_pos + torch.arange(len(as_neg), device=device)])
    out = Inputs(inputs.emb, inputs.labels, ref_emb, ref_labels, False, pos_mask, neg_mask)
    return out, Mined.from_pairs(a1, p, a2, n, pos_weights=pw, neg_weights=nw)


def _ones_if_none(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    return torch.ones(n, dtype=like.dtype, device=like.device) if weights is None else weights.to(like)


def soft_class_targets(spec: MixSpec, labels: Tensor, ref_labels: Tensor | None, num_classes: int) -> Tensor:
    """Soft class labels ``[M, num_classes]`` of the synthetic points, for losses over classes (proxies).

    Mixup's label interpolation (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR
    2018): point ``m`` is ``coeff[m]`` of the class of its first row and ``1 - coeff[m]`` of the class
    of its second row, except that the class of its anchor gets ``pos_weight[m]``, the spec's own
    soft label (so a MoCHi point mixed from the query stays a pure negative of the query's class).
    For a Metrix mix of an anchor's positive (or the anchor itself) with a negative, the anchor's
    class gets ``lambda`` and the negative's class ``1 - lambda``.
    """
    first = spec.rows("first", labels, ref_labels).long()
    second = spec.rows("second", labels, ref_labels).long()
    c = spec.coeff.to(torch.float64).unsqueeze(1)
    targets = c * F.one_hot(first, num_classes) + (1 - c) * F.one_hot(second, num_classes)
    anchor_class = labels[spec.anchors].long()
    rows = torch.arange(len(spec), device=targets.device)
    targets[rows, anchor_class] = spec.pos_weight.to(targets)
    return targets
