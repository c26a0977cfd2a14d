"""Row-wise reductions of a ``[B, M]`` matrix restricted to a mask, fast on CPU and exact for the kept entries.

``torch.where`` / ``masked_fill`` with a boolean mask, and ``any`` / ``argmax``, run several times
slower on CPU than same-dtype ``addcmul`` / ``amin`` / ``max``, and miners call them on ``B x M``
matrices. Entries outside the mask are pushed to ``-/+finfo.max`` by adding
``outside * -/+finfo.max`` (``outside`` a float 0/1 mask): a kept entry gets ``+ 0`` and keeps its
exact value, so maxima, minima and their first-index tie-breaking (``torch.max`` on CPU) are those
of the kept entries alone. (Assumes ``|value| << finfo.max``, true of any distance matrix.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from contracts.distances import BaseDistance


def push_outside(mat: Tensor, outside: Tensor, largest: bool, out: Tensor | None = None) -> Tensor:
    """``mat: [B, M]`` with entries where ``outside: [B, M]`` (float 0/1 or bool) is set moved to the far end.

    ``largest=True`` moves them to ``-finfo.max`` (they never win a max), else to ``+finfo.max``.
    """
    if outside.dtype == torch.bool:
        outside = outside.to(mat.dtype)
    big = torch.finfo(mat.dtype).max
    shift = torch.tensor(-big if largest else big, dtype=mat.dtype, device=mat.device)
    return torch.addcmul(mat, outside, shift, out=out)


def extreme_outside(
    mat: Tensor, outside: Tensor, largest: bool, consume: bool = False, want_any: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per row, the largest (or smallest) entry not marked in ``outside`` (float 0/1 ``[B, M]``).

    ``consume=True`` reuses ``outside``'s memory for the pushed matrix (saves a ``B x M`` allocation;
    ``outside`` is overwritten); ``want_any=False`` skips ``has_any`` (returned as None).
    Returns ``(values [B], indices [B], has_any [B])``. Ties resolve to the lowest index. Rows with
    no such entry have ``has_any`` False and a value of ``-/+finfo.max`` (what
    pytorch-metric-learning's miners use as "infinity").
    """
    has_any = outside.amin(dim=1) < 0.5 if want_any else None
    pushed = push_outside(mat, outside, largest, out=outside if consume else None)
    values, indices = pushed.max(dim=1) if largest else pushed.min(dim=1)
    return values, indices, has_any


def masked_extreme(mat: Tensor, keep: Tensor, largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``extreme_outside`` for a boolean ``keep: [B, M]`` mask of the entries to search."""
    return extreme_outside(mat, (~keep).to(mat.dtype), largest, consume=True)


def closest_largest(distance: BaseDistance) -> bool:
    """Whether "closest" means "largest value" for this distance (True for similarities)."""
    return bool(distance.is_inverted)
