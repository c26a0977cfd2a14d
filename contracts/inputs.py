"""What every miner and loss checks first: embeddings, relevance and the optional reference set (``Inputs``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from contracts.relevance import resolve_masks


class Inputs(NamedTuple):
    """Validated inputs. ``same_set`` is True when the reference set is the query set itself.

    Relevance: ``labels: [B]`` / ``ref_labels: [M]`` (None when relevance came as ``pos_mask`` only),
    and ``pos_mask`` / ``neg_mask``: bool ``[B, M]`` positives and negatives, self-pairs and ignored
    pairs removed, or both None when the labels alone say it. Read the masks through
    ``contracts.relevance`` (``relevance_masks``, ``outside_masks``, ``valid_pairs``), which derives
    them from the labels when they are None.
    """

    emb: Tensor
    labels: Tensor | None
    ref_emb: Tensor
    ref_labels: Tensor | None
    same_set: bool
    pos_mask: Tensor | None = None
    neg_mask: Tensor | None = None


def resolve_inputs(
    emb: Tensor,
    labels: Tensor | None = None,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    who: str = "input",
    *,
    pos_mask: Tensor | None = None,
    ignore_mask: Tensor | None = None,
) -> Inputs:
    """Check shapes, dtypes and finiteness; fill the reference set with the query set when absent.

    ``emb: [B, D]`` floating point. Relevance is ``labels: [B]`` integer (with ``ref_labels: [M]``
    when ``ref_emb: [M, D]`` is given), or ``pos_mask: [B, M]`` bool instead of labels (``M`` =
    ``len(ref_emb)``, or ``B`` without ``ref_emb``; no ``ref_labels``). ``ignore_mask: [B, M]`` bool,
    with either form, marks pairs that are neither positive nor negative. When the reference set is
    the batch, each row's pair with itself is ignored.
    """
    if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{who}: embeddings must be a floating-point tensor [batch, dim], got {_describe(emb)}")
    if labels is not None and pos_mask is not None:
        raise ValueError(f"{who}: got both labels and pos_mask; give one form of relevance (labels=None with pos_mask)")
    if labels is None and pos_mask is None:
        raise ValueError(f"{who}: no relevance given; pass labels [batch] or pos_mask=[batch, ref] (bool)")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            hint = "; a [batch, ref] bool mask of positives goes in pos_mask=" if isinstance(labels, Tensor) and labels.dim() == 2 else ""
            raise ValueError(f"{who}: labels must be an integer tensor [batch], got {_describe(labels)}{hint}")
        if len(labels) != len(emb):
            raise ValueError(f"{who}: {len(emb)} embeddings but {len(labels)} labels; expected one label per embedding")
    _check_finite(emb, f"{who}: embeddings")
    if pos_mask is not None and ref_labels is not None:
        raise ValueError(f"{who}: ref_labels given with pos_mask; with masks the reference set is ref_emb alone (pos_mask says which rows are relevant)")
    if labels is not None and (ref_emb is None) != (ref_labels is None):
        raise ValueError(f"{who}: ref_emb and ref_labels must be given together")
    same_set = ref_emb is None
    if same_set:
        ref_emb, ref_labels = emb, labels
    else:
        if not isinstance(ref_emb, Tensor) or ref_emb.dim() != 2 or ref_emb.shape[1] != emb.shape[1]:
            raise ValueError(f"{who}: ref_emb is a {_describe(ref_emb)}; expected [M, {emb.shape[1]}] like the embeddings")
        if labels is not None:
            if not isinstance(ref_labels, Tensor) or ref_labels.dim() != 1 or len(ref_labels) != len(ref_emb):
                raise ValueError(f"{who}: ref_labels is a {_describe(ref_labels)}; expected [{len(ref_emb)}]")
            ref_labels = ref_labels.to(labels.device)
        _check_finite(ref_emb, f"{who}: ref_emb")
    shape = (len(emb), len(ref_emb))
    pos_mask = _check_mask(pos_mask, "pos_mask", shape, same_set, who, emb.device)
    ignore_mask = _check_mask(ignore_mask, "ignore_mask", shape, same_set, who, emb.device)
    pos, neg = resolve_masks(labels, ref_labels, same_set, pos_mask, ignore_mask)
    return Inputs(emb, labels, ref_emb, ref_labels, same_set, pos, neg)


def _check_mask(mask: Tensor | None, name: str, shape: tuple[int, int], same_set: bool, who: str, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    ref = "the batch (no ref_emb)" if same_set else "ref_emb"
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"{who}: {name} must be a bool tensor [batch, ref] = {list(shape)}, got {_describe(mask)}")
    if tuple(mask.shape) != shape:
        raise ValueError(
            f"{who}: {name} has shape {tuple(mask.shape)}; expected {shape}: one row per embedding, "
            f"one column per reference row ({ref} has {shape[1]} rows)"
        )
    return mask.to(device)


def _check_finite(x: Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{what} contain NaN or Inf in rows {bad[:10]}{' ...' if len(bad) > 10 else ''}; check the encoder output and learning rate")


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
