"""Relevance from labels: which pairs are positives and negatives, and the "all valid tuples" sets.

Labels are the shorthand for relevance (same label = positive); they become boolean ``[B, M]``
masks here, in one place, and miners and losses read the masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from contracts.mined import Mined


def label_masks(labels: Tensor, ref_labels: Tensor, same_set: bool) -> tuple[Tensor, Tensor]:
    """Boolean ``[B, M]`` masks of positives (same label, not the row itself) and negatives (other label)."""
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    pos = same.clone()
    if same_set:
        pos.fill_diagonal_(False)
    return pos, ~same


def all_pairs(labels: Tensor, ref_labels: Tensor, same_set: bool) -> Mined:
    """Every positive and every negative pair (the default when a loss gets ``mined=None``)."""
    pos, neg = label_masks(labels, ref_labels, same_set)
    a1, p = torch.where(pos)
    a2, n = torch.where(neg)
    return Mined.from_pairs(a1, p, a2, n)


def all_triplets(labels: Tensor, ref_labels: Tensor, same_set: bool) -> Mined:
    """Every triplet ``(a, p, n)`` with ``label[a] == ref_label[p] != ref_label[n]`` and ``p != a``."""
    pos, neg = label_masks(labels, ref_labels, same_set)
    a, p, n = torch.where(pos.unsqueeze(2) & neg.unsqueeze(1))
    return Mined.from_triplets(a, p, n)
