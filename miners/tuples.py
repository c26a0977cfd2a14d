"""Shared helpers for miners and losses: input checks, label masks, and the "all valid tuples" sets."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from miners.mined import Mined


class Inputs(NamedTuple):
    """Validated inputs. ``same_set`` is True when the reference set is the query set itself."""

    emb: Tensor
    labels: Tensor
    ref_emb: Tensor
    ref_labels: Tensor
    same_set: bool


def resolve_inputs(
    emb: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    who: str = "input",
) -> Inputs:
    """Check shapes, dtypes and finiteness; fill the reference set with the query set when absent.

    ``emb: [B, D]`` floating point, ``labels: [B]`` integer; ``ref_emb: [M, D]`` and
    ``ref_labels: [M]`` come together or not at all.
    """
    if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{who}: embeddings must be a floating-point tensor [batch, dim], got {_describe(emb)}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{who}: labels must be an integer tensor [batch], got {_describe(labels)}")
    if len(labels) != len(emb):
        raise ValueError(f"{who}: {len(emb)} embeddings but {len(labels)} labels; expected one label per embedding")
    _check_finite(emb, f"{who}: embeddings")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError(f"{who}: ref_emb and ref_labels must be given together")
    if ref_emb is None:
        return Inputs(emb, labels, emb, labels, True)
    if ref_emb.dim() != 2 or ref_emb.shape[1] != emb.shape[1]:
        raise ValueError(f"{who}: ref_emb has shape {tuple(ref_emb.shape)}; expected [M, {emb.shape[1]}] like the embeddings")
    if ref_labels.dim() != 1 or len(ref_labels) != len(ref_emb):
        raise ValueError(f"{who}: ref_labels has shape {tuple(ref_labels.shape)}; expected [{len(ref_emb)}]")
    _check_finite(ref_emb, f"{who}: ref_emb")
    return Inputs(emb, labels, ref_emb, ref_labels.to(labels.device), False)


def _check_finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{what} contain NaN or Inf in rows {bad[:10]}{' ...' if len(bad) > 10 else ''}; check the encoder output and learning rate")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


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
