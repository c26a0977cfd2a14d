"""Relevance: which pairs are positives, which are negatives, and the "all valid tuples" sets.

Relevance comes in two forms. Labels are the shorthand (same label = positive, other label =
negative); the general form is a boolean ``pos_mask: [B, M]`` (query row ``i`` and reference row
``j`` are a positive pair), with an optional ``ignore_mask: [B, M]`` of pairs that are neither
positive nor negative (known false negatives, duplicates). When the reference set is the batch
itself, the row paired with itself is ignored in both forms.

Both forms become the same two boolean ``[B, M]`` masks here, in one place (``relevance_masks``);
miners and losses read the masks. The label form keeps its fast paths (``outside_masks`` builds the
float masks the miners' reductions want straight from the labels; ``has_pos_and_neg`` counts labels
in ``O((B + M) log M)``), so code written against labels loses nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from contracts.mined import Mined

if TYPE_CHECKING:
    from contracts.inputs import Inputs


def label_masks(labels: Tensor, ref_labels: Tensor, same_set: bool) -> tuple[Tensor, Tensor]:
    """Boolean ``[B, M]`` masks of positives (same label, not the row itself) and negatives (other label)."""
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    pos = same.clone()
    if same_set:
        pos.fill_diagonal_(False)
    return pos, ~same


def resolve_masks(
    labels: Tensor | None,
    ref_labels: Tensor | None,
    same_set: bool,
    pos_mask: Tensor | None,
    ignore_mask: Tensor | None,
) -> tuple[Tensor | None, Tensor | None]:
    """The ``(pos, neg)`` masks ``Inputs`` carries: ``(None, None)`` for labels alone (the masks are then
    derived from the labels when asked for, on the fast paths), else bool ``[B, M]`` with the self-pairs
    (``same_set``) and the ignored pairs removed from both. Shapes and dtypes are checked by ``resolve_inputs``.
    """
    if pos_mask is None and ignore_mask is None:
        return None, None
    if pos_mask is None:
        pos, neg = label_masks(labels, ref_labels, same_set)
    else:
        pos, neg = pos_mask.clone(), ~pos_mask
        if same_set:
            pos.fill_diagonal_(False)
            neg.fill_diagonal_(False)
    if ignore_mask is not None:
        keep = ~ignore_mask
        pos &= keep
        neg &= keep
    return pos, neg


def relevance_masks(inputs: Inputs) -> tuple[Tensor, Tensor]:
    """Boolean ``[B, M]`` masks ``(pos, neg)`` of the positive and negative pairs of ``inputs``.

    A pair can be neither (the row itself when the reference set is the batch, an ignored pair),
    never both. This is where labels become masks.
    """
    if inputs.pos_mask is not None:
        return inputs.pos_mask, inputs.neg_mask
    return label_masks(inputs.labels, inputs.ref_labels, inputs.same_set)


def outside_masks(inputs: Inputs, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Float ``[B, M]`` masks, 1 where an entry is *not* a positive / *not* a negative, else 0.

    The complements of ``relevance_masks``, built in the matrix dtype so that the miners' masked
    reductions (``miners.masked_reductions``) stay same-dtype. From labels they are built directly.
    """
    if inputs.pos_mask is not None:
        return (~inputs.pos_mask).to(dtype), (~inputs.neg_mask).to(dtype)
    not_neg = (inputs.labels.unsqueeze(1) == inputs.ref_labels.unsqueeze(0)).to(dtype)
    not_pos = 1 - not_neg
    if inputs.same_set:
        not_pos.fill_diagonal_(1)
    return not_pos, not_neg


def has_pos_and_neg(inputs: Inputs) -> Tensor:
    """Bool ``[B]``: which query rows have at least one positive and one negative pair."""
    if inputs.pos_mask is not None:
        return inputs.pos_mask.any(dim=1) & inputs.neg_mask.any(dim=1)
    same = same_label_counts(inputs.labels, inputs.ref_labels)
    return (same > int(inputs.same_set)) & (same < len(inputs.ref_labels))


def same_label_counts(labels: Tensor, ref_labels: Tensor) -> Tensor:
    """``[B]``: how many reference labels equal each query label, in ``O((B + M) log M)``."""
    values, counts = torch.unique(ref_labels, return_counts=True)
    if len(values) == 0:
        return torch.zeros_like(labels)
    where = torch.searchsorted(values, labels).clamp_(max=len(values) - 1)
    return torch.where(values[where] == labels, counts[where], 0)


def pairs_of(pos: Tensor, neg: Tensor) -> Mined:
    """Every pair of the bool ``[B, M]`` masks as index lists (row-major order)."""
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    return Mined.from_pairs(a1, p, a2, n)


def triplets_of(pos: Tensor, neg: Tensor) -> Mined:
    """Every triplet ``(a, p, n)`` with ``pos[a, p]`` and ``neg[a, n]`` as index lists."""
    a, p, n = torch.where(pos.unsqueeze(2) & neg.unsqueeze(1))
    return Mined.from_triplets(a, p, n)


def valid_pairs(inputs: Inputs) -> Mined:
    """Every positive and every negative pair of ``inputs`` (the default when a loss gets ``mined=None``)."""
    return pairs_of(*relevance_masks(inputs))


def valid_triplets(inputs: Inputs) -> Mined:
    """Every triplet ``(a, p, n)`` of ``inputs``: ``p`` a positive and ``n`` a negative of ``a``."""
    return triplets_of(*relevance_masks(inputs))


def all_pairs(labels: Tensor, ref_labels: Tensor, same_set: bool) -> Mined:
    """Every positive and every negative pair by labels (``valid_pairs`` for ``Inputs``)."""
    return pairs_of(*label_masks(labels, ref_labels, same_set))


def all_triplets(labels: Tensor, ref_labels: Tensor, same_set: bool) -> Mined:
    """Every triplet ``(a, p, n)`` with ``label[a] == ref_label[p] != ref_label[n]`` and ``p != a``."""
    return triplets_of(*label_masks(labels, ref_labels, same_set))


def id_masks(pos_ids: Tensor, ref_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance by document ids: ``pos_ids [B, P]`` lists each query's relevant ids (``-1`` pads a
    row), ``ref_ids [M]`` the id of each reference (``-1``: an empty slot, e.g. a hard negative a
    query's file did not have). Returns ``(pos, ignore)`` ``[B, M]``: a reference is a positive of
    every query that lists its id (so a passage relevant to two queries of the batch, or a known
    positive drawn as another query's negative, is never a negative), and an empty slot is ignored."""
    if pos_ids.dim() != 2:
        raise ValueError(f"pos_ids has shape {tuple(pos_ids.shape)}; expected [B, P] (relevant ids per query, -1 padded)")
    if ref_ids.dim() != 1:
        raise ValueError(f"ref_ids has shape {tuple(ref_ids.shape)}; expected [M]")
    ref_ids = ref_ids.to(pos_ids.device)
    valid = ref_ids >= 0
    pos = (pos_ids.unsqueeze(1) == ref_ids.view(1, -1, 1)).any(-1) & valid.unsqueeze(0)
    return pos, (~valid).unsqueeze(0).expand(len(pos_ids), -1).clone()
