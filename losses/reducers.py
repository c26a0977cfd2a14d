"""Reducers: how a loss turns its per-tuple losses into a scalar, by pytorch-metric-learning's names and semantics.

"A Metric Learning Reality Check" (Musgrave, Belongie, Lim, ECCV 2020) shows that the reduction is
an ablation axis of its own: averaging a triplet loss over every triplet or only over the triplets
with a non-zero loss changes what is learned. So a loss takes a reducer as pytorch-metric-learning's
do: ``TripletMarginLoss(reducer=AvgNonZeroReducer())``.

A loss without ``reducer`` (the default) reduces as its pytorch-metric-learning counterpart does by
default (named in its docstring) on its own fused fast path. With a reducer, the loss lists its
per-tuple losses as named parts (``BaseLoss.tuple_losses``: PML's ``loss_dict``), each of one kind:

- ``"element"``: one loss per query row, ``indices`` the rows ``[B]`` (multi-similarity, SupCon, circle);
- ``"pos_pair"`` / ``"neg_pair"``: one loss per pair, ``indices = (a, other)`` (contrastive, NT-Xent);
- ``"triplet"``: one loss per triplet, ``indices = (a, p, n)`` (triplet margin).

The reducer maps each part to a scalar and the parts are summed (``MultipleReducers`` picks a reducer
per part name). Per-tuple weights of a ``Mined`` multiply the losses before the reducer sees them.
An empty part reduces to a zero that keeps the graph (PML: ``zero_loss``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn


class LossPart(NamedTuple):
    """Per-tuple losses of one term of a loss (PML's ``{"losses", "indices", "reduction_type"}``)."""

    losses: Tensor
    indices: Tensor | tuple[Tensor, ...]
    kind: str


def row_parts(rows: Tensor | None, like: Tensor) -> dict[str, LossPart]:
    """Per-row losses ``L_a [B]`` as PML's ``"element"`` reduction type (``None``: nothing mined, no rows)."""
    rows = like.new_zeros(0) if rows is None else rows
    return {"loss": LossPart(rows, torch.arange(len(rows), device=rows.device), "element")}


def weighted(losses: Tensor, weights: Tensor | None) -> Tensor:
    return losses if weights is None else losses * weights.to(losses.dtype)


def mean_nonzero(losses: Tensor, zero: Tensor) -> Tensor:
    """Mean over the entries that are > 0 (``AvgNonZeroReducer``); ``zero`` when none is."""
    nonzero = losses > 0
    count = int(nonzero.sum())
    if count == 0:
        return zero
    return losses.sum() / count


def mean(losses: Tensor, zero: Tensor) -> Tensor:
    """Plain mean (``MeanReducer``); ``zero`` for an empty set."""
    if losses.numel() == 0:
        return zero
    return losses.mean()


class BaseReducer(nn.Module):
    """Reduce one ``LossPart`` to a scalar. Subclasses implement ``reduce``.

    ``forward(part, n_query, n_ref, zero)``: ``n_query``/``n_ref`` are the sizes of the query and
    reference sets (``PerAnchorReducer`` needs them), ``zero`` the graph-keeping zero of the loss.
    """

    def forward(self, part: LossPart, n_query: int, n_ref: int, zero: Tensor) -> Tensor:
        if part.losses.numel() == 0:
            return zero
        return self.reduce(part, n_query, n_ref, zero)

    def reduce(self, part: LossPart, n_query: int, n_ref: int, zero: Tensor) -> Tensor:
        raise NotImplementedError


class MeanReducer(BaseReducer):
    """The mean of all per-tuple losses, zeros included."""

    def reduce(self, part, n_query, n_ref, zero):
        return part.losses.mean()


class SumReducer(BaseReducer):
    """The sum of all per-tuple losses."""

    def reduce(self, part, n_query, n_ref, zero):
        return part.losses.sum()


class ThresholdReducer(BaseReducer):
    """The mean of the losses strictly between ``low`` and ``high`` (either may be omitted); 0 if none is.

    As PML's ``ThresholdReducer(low, high)``: a loss must be ``> low`` and ``< high`` to count.
    """

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        super().__init__()
        if low is None and high is None:
            raise ValueError("ThresholdReducer needs low or high (or both); with neither use MeanReducer")
        self.low, self.high = low, high

    def reduce(self, part, n_query, n_ref, zero):
        losses = part.losses
        if self.low is not None:
            losses = losses[losses > self.low]
        if self.high is not None:
            losses = losses[losses < self.high]
        return losses.mean() if losses.numel() else zero

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class AvgNonZeroReducer(ThresholdReducer):
    """The mean over the tuples whose loss is > 0 (``ThresholdReducer(low=0)``); 0 if none is."""

    def __init__(self) -> None:
        super().__init__(low=0)


def per_anchor_mean(x: Tensor, count: Tensor) -> Tensor:
    """PML's default ``aggregation_func``: row sums of ``x [B, M]`` over the ``count [B]`` listed entries; 0 for empty rows."""
    return torch.where(count > 0, x.sum(dim=1) / count.clamp(min=1), torch.zeros((), dtype=x.dtype, device=x.device))


class PerAnchorReducer(BaseReducer):
    """Average each anchor's pair losses first (``aggregation_func``), then reduce the ``[B]`` anchors with ``reducer``.

    As PML's ``PerAnchorReducer``: pair losses are placed in a ``[B, M]`` array at ``(a, other)`` (a
    pair listed twice keeps one value), ``aggregation_func(array, count_per_row) -> [B]`` gives one
    loss per query row (rows without pairs give 0) and ``reducer`` (default ``MeanReducer``) reduces
    those as elements. Element losses go to ``reducer`` directly. Triplet losses are refused, as in PML.
    """

    def __init__(self, reducer: BaseReducer | None = None, aggregation_func: Callable[[Tensor, Tensor], Tensor] = per_anchor_mean) -> None:
        super().__init__()
        self.reducer = reducer if reducer is not None else MeanReducer()
        self.aggregation_func = aggregation_func

    def reduce(self, part, n_query, n_ref, zero):
        if part.kind == "element":
            return self.reducer(part, n_query, n_ref, zero)
        if part.kind == "triplet":
            raise ValueError("PerAnchorReducer reduces element and pair losses, not triplets (as in pytorch-metric-learning)")
        a, other = part.indices
        losses = part.losses
        listed = torch.zeros(n_query, n_ref, dtype=torch.bool, device=losses.device)
        listed[a, other] = True
        array = torch.zeros(n_query, n_ref, dtype=losses.dtype, device=losses.device).index_put((a, other), losses)
        per_row = self.aggregation_func(array, listed.sum(dim=1).to(losses.dtype))
        rows = torch.arange(n_query, device=losses.device)
        return self.reducer(LossPart(per_row, rows, "element"), n_query, n_ref, zero)


class DoNothingReducer(BaseReducer):
    """No reduction: the loss returns its parts, ``{name: {"losses", "indices", "reduction_type"}}``, as PML's does."""

    def reduce(self, part, n_query, n_ref, zero):
        raise RuntimeError("DoNothingReducer is handled by BaseLoss, which returns the unreduced parts")


class MultipleReducers(BaseReducer):
    """A reducer per part name (``{"pos_loss": ..., "neg_loss": ...}``), ``default_reducer`` for the others."""

    def __init__(self, reducers: dict[str, BaseReducer], default_reducer: BaseReducer | None = None) -> None:
        super().__init__()
        self.reducers = nn.ModuleDict(reducers)
        self.default_reducer = default_reducer if default_reducer is not None else MeanReducer()

    def for_part(self, name: str) -> BaseReducer:
        return self.reducers[name] if name in self.reducers else self.default_reducer

    def reduce(self, part, n_query, n_ref, zero):
        raise RuntimeError("MultipleReducers is handled by BaseLoss, which picks a reducer per part name")


def reduce_parts(reducer: BaseReducer, parts: dict[str, LossPart], n_query: int, n_ref: int, zero: Tensor) -> Tensor | dict:
    """Sum of each part reduced by ``reducer`` (its per-name choice for ``MultipleReducers``); the parts themselves for ``DoNothingReducer``."""
    if isinstance(reducer, DoNothingReducer):
        return {name: {"losses": p.losses, "indices": p.indices, "reduction_type": p.kind} for name, p in parts.items()}
    total = zero
    for name, part in parts.items():
        chosen = reducer.for_part(name) if isinstance(reducer, MultipleReducers) else reducer
        total = total + chosen(part, n_query, n_ref, zero)
    return total
