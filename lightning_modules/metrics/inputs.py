"""Input checks shared by the retrieval function and the Metric classes; errors name the argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from contracts.arguments import is_int_at_least

Distance = Literal["cosine", "euclidean"]
ArrayLike = Tensor | np.ndarray
DISTANCES = ("cosine", "euclidean")


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(dict.fromkeys(ks))


def as_embeddings(x: Any, name: str) -> Tensor:
    t = as_tensor(x, name)
    if t.dim() != 2 or not t.is_floating_point() or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty floating-point array [N, D], got {describe(t)}")
    check_finite(t, name)
    return t


def check_finite(t: Tensor, name: str) -> None:
    finite = torch.isfinite(t).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"{name} has NaN or Inf in rows {bad[:10]}{' ...' if len(bad) > 10 else ''}")


def as_labels(x: Any, name: str, n: int, emb_name: str) -> Tensor:
    return _as_int_vector(x, name, n, emb_name, " of class labels", "one label per embedding")


def _as_int_vector(x: Any, name: str, n: int, emb_name: str, what: str, expected: str) -> Tensor:
    """``x`` as a long tensor ``[n]`` of integers (one per row of ``emb_name``), or the error naming ``what`` it should be."""
    t = as_tensor(x, name)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer array [N]{what}, got {describe(t)}")
    if len(t) != n:
        raise ValueError(f"{name} has {len(t)} entries but {emb_name} has {n} rows; expected {expected}")
    return t.long()


def as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, Tensor):
        return x.detach().cpu()
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}"


def check_update(emb: Tensor, labels: Tensor, index: Tensor | None, owner: str) -> None:
    if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{owner}.update: emb must be a floating-point tensor [B, D], got {emb!r:.80}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(emb):
        raise ValueError(
            f"{owner}.update: labels must be an integer tensor [B] with B = {len(emb)} (one per embedding), "
            f"got {describe(labels) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if index is not None and (
        not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or len(index) != len(emb)
    ):
        raise ValueError(f"{owner}.update: index must be an integer tensor [B] with B = {len(emb)} (one per embedding)")


def check_chunk(chunk_size: int) -> None:
    if not is_int_at_least(chunk_size, 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def as_index(x: Any, name: str, n: int, emb_name: str) -> Tensor:
    t = _as_int_vector(x, name, n, emb_name, "", "one per row")
    if len(t) and int(t.min()) < 0:
        raise ValueError(f"{name} has negative entries (first at position {int((t < 0).nonzero()[0])}); expected indices >= 0")
    return t


def check_batch(emb: Any, owner: str, name: str) -> Tensor:
    if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
        got = describe(emb) if isinstance(emb, Tensor) else type(emb).__name__
        raise ValueError(f"{owner}.update: {name} must be a floating-point tensor [B, D], got {got}")
    return emb.detach()


def check_batch_index(x: Any, n: int, owner: str, name: str, emb_name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 1 or x.is_floating_point() or x.dtype == torch.bool or len(x) != n:
        got = describe(x) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{owner}.update: {name} must be an integer tensor [B] with B = {n} (one per row of {emb_name}), got {got}")
    if n and int(x.min()) < 0:
        raise ValueError(f"{owner}.update: {name} has negative entries; expected dataset indices >= 0")
    return x.detach().long()
