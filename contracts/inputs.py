"""What every miner and loss checks first: embeddings, labels and the optional reference set (``Inputs``)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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
