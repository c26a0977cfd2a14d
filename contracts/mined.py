"""The miner -> loss contract: ``Mined`` index tuples, per-tuple weights, and a mixing spec.

Every index in a ``Mined`` points into two sets: the anchor (first) index of a tuple into the query
embeddings ``emb`` and every other index into the reference set ``ref_emb`` (which is ``emb`` itself
when no reference set is given, as in pytorch-metric-learning). A loss asks for the form it needs
(``as_pairs()``, ``as_triplets()`` or the dense ``pair_matrices()``) and never asks which miner
produced the tuples.

Pairs come in one of two equivalent forms: index lists (``pos_pairs``/``neg_pairs``, for miners that
pick few pairs) or dense ``[B, M]`` masks (``pos_mask``/``neg_mask``, for miners that keep a large
share of all pairs, like multi-similarity's millions at B = 2048, where listing them costs more than
the loss). Either form converts to the other on request.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from contracts.mix_spec import MixSpec


class Pairs(NamedTuple):
    """Positive pairs ``(a1[i], p[i])`` and negative pairs ``(a2[j], n[j])`` with their weights."""

    a1: Tensor
    p: Tensor
    a2: Tensor
    n: Tensor
    pos_weights: Tensor | None
    neg_weights: Tensor | None


class Triplets(NamedTuple):
    """Triplets ``(a[i], p[i], n[i])`` with optional per-triplet weights."""

    a: Tensor
    p: Tensor
    n: Tensor
    weights: Tensor | None


class TripletMask(NamedTuple):
    """Triplets in dense form: ``(a, positives[a, k], n)`` for every ``mask[a, k, n]`` set.

    ``positives: [B, K]`` int64 lists each anchor's positives in the reference set (padded to the
    largest count ``K``; a padded slot holds any valid index and is never set in ``mask``);
    ``mask: [B, K, M]`` is bool, or float (the triplet's weight, 0 = not mined). A band or margin
    miner keeps millions of triplets at B = 2048; this form holds them in ``B K M`` bits and lets a
    loss reduce them with broadcasts over the ``[B, M]`` distance matrix instead of index lists.
    """

    positives: Tensor
    mask: Tensor


def _join_by_anchor(a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """``(i, j)`` for every ``a1[i] == a2[j]``, in the order of ``torch.where(a1[:, None] == a2[None])``.

    A sort-based join, ``O((P + N) log N + output)``: the ``[P, N]`` comparison matrix it replaces
    reached 10^8 entries for in-batch top-k mining at B = 2048.
    """
    order = torch.argsort(a2, stable=True)
    sorted_a2 = a2[order]
    start = torch.searchsorted(sorted_a2, a1, side="left")
    counts = torch.searchsorted(sorted_a2, a1, side="right") - start
    i = torch.repeat_interleave(torch.arange(len(a1), device=a1.device), counts)
    first = torch.repeat_interleave(start - (torch.cumsum(counts, 0) - counts), counts)
    j = order[first + torch.arange(len(i), device=a1.device)]
    return i, j


def check_weights(weights: Tensor | None, what: str) -> None:
    """Raise ``ValueError`` if per-tuple weights are negative or not finite."""
    if weights is None or weights.numel() == 0:
        return
    if not torch.isfinite(weights).all() or bool((weights < 0).any()):
        raise ValueError(f"Mined {what} must be finite and >= 0; got min {float(weights.min())}, max {float(weights.max())}")


def _check_mask_values(mask: Tensor, name: str) -> None:
    """A pair or triplet mask is bool, or float weights (checked by ``check_weights``)."""
    if mask.dtype == torch.bool:
        return
    if not mask.is_floating_point():
        raise ValueError(f"Mined.{name} must be bool or floating point (tuple weights), got {mask.dtype}")
    check_weights(mask, name)


def _listed(mask: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Row and column indices of a mask's mined entries, in row-major order (as ``torch.where``)."""
    if mask is None:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    rows, cols = torch.where(mask if mask.dtype == torch.bool else mask > 0)
    return rows, cols


def _mask_weights(mask: Tensor | None) -> Tensor | None:
    """The weights of a float mask's mined entries (``_listed`` order); None for a bool mask."""
    if mask is None or mask.dtype == torch.bool:
        return None
    return mask[mask > 0]


def pair_weight_matrix(
    rows: Tensor,
    cols: Tensor,
    weights: Tensor | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
    accumulate: bool = False,
) -> Tensor:
    """Scatter pair weights into a dense matrix ``[B, M]``; entries of unlisted pairs are 0.

    ``rows, cols: [P]`` index the pairs, ``weights: [P]`` (``None`` means all ones). A pair listed
    more than once keeps its largest weight (``accumulate=False``: a mask, as pytorch-metric-learning's
    matrix-based losses build it) or the sum of its weights (``accumulate=True``: every listing is a
    separate term, as its pair-based losses treat duplicates).
    """
    out = torch.zeros(shape, dtype=dtype, device=rows.device)
    if len(rows) == 0:
        return out
    w = torch.ones(len(rows), dtype=dtype, device=rows.device) if weights is None else weights.to(dtype)
    if accumulate:
        return out.index_put_((rows, cols), w, accumulate=True)
    flat = rows * shape[1] + cols
    return out.view(-1).scatter_reduce(0, flat, w, reduce="amax", include_self=True).view(shape)


def _long(x: Tensor | None) -> Tensor | None:
    return None if x is None else torch.as_tensor(x).long()


@dataclass(frozen=True)
class Mined:
    """What a miner returns: pairs and/or triplets into the reference set, and optional extras.

    Fields:
        pos_pairs: ``(a, p)`` anchors into ``emb``, positives into the reference set.
        neg_pairs: ``(a, n)`` likewise for negatives.
        triplets: ``(a, p, n)``.
        pos_weights / neg_weights / triplet_weights: per-tuple weights (soft labels, false-negative
            down-weighting); ``None`` means all ones.
        pos_mask / neg_mask: the dense form of ``pos_pairs`` / ``neg_pairs`` (not both forms at
            once): ``[B, M]``, bool (mined or not) or float (the pair's weight, 0 = not mined).
        triplet_mask: the dense form of ``triplets`` (``TripletMask``; not both forms at once).
        mix: synthetic points to add (see ``MixSpec``).
        matrices: distance matrices the miner computed (``contracts.distances.ComputedMatrix``); a loss
            with the same distance on the same embeddings reuses them instead of recomputing.
            ``BaseMiner`` fills it; not part of the tuples (ignored by ``==`` and ``repr``).
    """

    pos_pairs: tuple[Tensor, Tensor] | None = None
    neg_pairs: tuple[Tensor, Tensor] | None = None
    triplets: tuple[Tensor, Tensor, Tensor] | None = None
    pos_weights: Tensor | None = None
    neg_weights: Tensor | None = None
    triplet_weights: Tensor | None = None
    mix: MixSpec | None = field(default=None)
    pos_mask: Tensor | None = None
    neg_mask: Tensor | None = None
    triplet_mask: TripletMask | None = None
    matrices: tuple = field(default=(), compare=False, repr=False)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pairs(
        cls,
        a1: Tensor,
        p: Tensor,
        a2: Tensor,
        n: Tensor,
        pos_weights: Tensor | None = None,
        neg_weights: Tensor | None = None,
    ) -> "Mined":
        return cls(pos_pairs=(_long(a1), _long(p)), neg_pairs=(_long(a2), _long(n)), pos_weights=pos_weights, neg_weights=neg_weights)

    @classmethod
    def from_masks(cls, pos_mask: Tensor, neg_mask: Tensor) -> "Mined":
        """Pairs as dense ``[B, M]`` masks: bool, or float weights (0 = not mined)."""
        return cls(pos_mask=pos_mask, neg_mask=neg_mask)

    @classmethod
    def from_triplet_mask(cls, positives: Tensor, mask: Tensor) -> "Mined":
        """Triplets in dense form (see ``TripletMask``)."""
        return cls(triplet_mask=TripletMask(positives.long(), mask))

    @classmethod
    def from_triplets(cls, a: Tensor, p: Tensor, n: Tensor, weights: Tensor | None = None) -> "Mined":
        return cls(triplets=(_long(a), _long(p), _long(n)), triplet_weights=weights)

    @classmethod
    def from_tuple(cls, indices: tuple[Tensor, ...]) -> "Mined":
        """Accept pytorch-metric-learning's ``indices_tuple``: ``(a, p, n)`` or ``(a1, p, a2, n)``."""
        if len(indices) == 3:
            return cls.from_triplets(*indices)
        if len(indices) == 4:
            return cls.from_pairs(*indices)
        raise ValueError(f"an indices tuple has 3 (triplets) or 4 (pairs) tensors, got {len(indices)}")

    # ------------------------------------------------------------------------------ conversions
    @property
    def has_pairs(self) -> bool:
        return self.pos_pairs is not None or self.neg_pairs is not None or self.has_masks

    @property
    def has_masks(self) -> bool:
        return self.pos_mask is not None or self.neg_mask is not None

    def without_matrices(self) -> "Mined":
        """The same tuples without the miner's distance matrices (to keep a ``Mined`` without its memory)."""
        return replace(self, matrices=()) if self.matrices else self

    def pair_matrices(self, shape: tuple[int, int], dtype: torch.dtype, accumulate: bool = False) -> tuple[Tensor, Tensor]:
        """Dense ``[B, M]`` pair weights ``(pos_w, neg_w)``; 0 marks a pair that was not mined.

        From the masks as they are (a bool mask stays bool: it means weight 1), else scattered from
        the pair lists (triplets give their two pairs) by ``pair_weight_matrix``: a pair listed more
        than once keeps its largest weight, or the sum of its weights with ``accumulate=True``.
        """
        if self.has_masks:
            return tuple(
                torch.zeros(shape, dtype=torch.bool, device=self._device()) if m is None else m  # type: ignore[misc]
                for m in (self.pos_mask, self.neg_mask)
            )
        a1, p, a2, n, pw, nw = self.as_pairs()
        return (
            pair_weight_matrix(a1, p, pw, shape, dtype, accumulate),
            pair_weight_matrix(a2, n, nw, shape, dtype, accumulate),
        )

    @property
    def has_triplets(self) -> bool:
        return self.triplets is not None or self.triplet_mask is not None

    def as_pairs(self) -> Pairs:
        """Pairs as pytorch-metric-learning's ``convert_to_pairs``: triplet ``(a, p, n)`` gives ``(a, p)`` and ``(a, n)``."""
        if self.has_masks:
            a1, p = _listed(self.pos_mask, self._device())
            a2, n = _listed(self.neg_mask, self._device())
            return Pairs(a1, p, a2, n, _mask_weights(self.pos_mask), _mask_weights(self.neg_mask))
        if self.has_pairs:
            device = self._device()
            empty = torch.empty(0, dtype=torch.long, device=device)
            a1, p = self.pos_pairs if self.pos_pairs is not None else (empty, empty)
            a2, n = self.neg_pairs if self.neg_pairs is not None else (empty, empty)
            return Pairs(a1, p, a2, n, self.pos_weights, self.neg_weights)
        if self.has_triplets:
            a, p, n, w = self.as_triplets()
            return Pairs(a, p, a, n, w, w)
        empty = torch.empty(0, dtype=torch.long, device=self._device())
        return Pairs(empty, empty, empty, empty, None, None)

    def as_triplets(self) -> Triplets:
        """Triplets as ``convert_to_triplets``: every positive pair joined with every negative pair of the same anchor.

        The weight of a joined triplet is the product of its two pair weights.
        """
        if self.triplet_mask is not None:
            positives, mask = self.triplet_mask
            a, k, n = torch.where(mask if mask.dtype == torch.bool else mask > 0)
            return Triplets(a, positives[a, k], n, None if mask.dtype == torch.bool else mask[a, k, n])
        if self.has_triplets:
            return Triplets(*self.triplets, self.triplet_weights)
        a1, p, a2, n, pw, nw = self.as_pairs()
        pi, ni = _join_by_anchor(a1, a2)
        weights = None
        if pw is not None or nw is not None:
            ones_p = torch.ones(len(a1), device=a1.device) if pw is None else pw
            ones_n = torch.ones(len(a2), device=a2.device) if nw is None else nw
            weights = ones_p[pi] * ones_n[ni]
        return Triplets(a1[pi], p[pi], n[ni], weights)

    def to_tuple(self) -> tuple[Tensor, ...]:
        """pytorch-metric-learning's ``indices_tuple`` form (triplets if present, else pairs)."""
        if self.has_triplets:
            return tuple(self.as_triplets()[:3])
        return tuple(self.as_pairs()[:4])

    def __iter__(self):
        """Unpacks like pytorch-metric-learning's ``indices_tuple``: ``a, p, n = miner(emb, labels)`` for a
        triplet miner, ``a1, p, a2, n = ...`` for a pair miner (``to_tuple``; dense forms are listed).

        ``len(mined)`` stays the number of tuples, not 3 or 4: hand ``mined.to_tuple()`` to code that
        calls ``len`` on an indices tuple (pytorch-metric-learning's own losses do)."""
        return iter(self.to_tuple())

    def __len__(self) -> int:
        """Number of tuples: triplets if present, else positive plus negative pairs."""
        if self.triplet_mask is not None:
            return int(torch.count_nonzero(self.triplet_mask.mask))
        if self.has_triplets:
            return len(self.triplets[0])
        if self.has_masks:
            return sum(int(torch.count_nonzero(m)) for m in (self.pos_mask, self.neg_mask) if m is not None)
        a1, _, a2, _, _, _ = self.as_pairs()
        return len(a1) + len(a2)

    # ------------------------------------------------------------------------------- validation
    def validate(self, n_query: int, n_ref: int) -> None:
        """Raise ``ValueError`` if any index is out of range or a weight does not match its tuples."""
        groups = {
            "pos_pairs": (self.pos_pairs, self.pos_weights),
            "neg_pairs": (self.neg_pairs, self.neg_weights),
            "triplets": (self.triplets, self.triplet_weights),
        }
        for name, (tensors, weights) in groups.items():
            if tensors is None:
                if weights is not None:
                    raise ValueError(f"Mined has weights for {name} but no {name}")
                continue
            lengths = {len(t) for t in tensors}
            if len(lengths) != 1:
                raise ValueError(f"Mined.{name} tensors have different lengths {sorted(lengths)}")
            for pos, t in enumerate(tensors):
                if t.dtype != torch.long or t.dim() != 1:
                    raise ValueError(f"Mined.{name}[{pos}] must be a 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
                bound = n_query if pos == 0 else n_ref
                if len(t) and (int(t.min()) < 0 or int(t.max()) >= bound):
                    which = "query" if pos == 0 else "reference"
                    raise ValueError(f"Mined.{name}[{pos}] indexes outside the {which} set of size {bound}")
            if weights is not None and weights.shape != (lengths.pop(),):
                raise ValueError(f"Mined weights for {name} have shape {tuple(weights.shape)}; expected one per tuple")
        for name in ("pos_mask", "neg_mask"):
            mask = getattr(self, name)
            if mask is None:
                continue
            if (self.pos_pairs, self.neg_pairs)[name == "neg_mask"] is not None:
                raise ValueError(f"Mined has both {name} and its pair lists; give one form of the pairs")
            if mask.shape != (n_query, n_ref):
                raise ValueError(f"Mined.{name} has shape {tuple(mask.shape)}; expected [{n_query}, {n_ref}] (queries x reference set)")
            _check_mask_values(mask, name)
        if self.triplet_mask is not None:
            if self.triplets is not None:
                raise ValueError("Mined has both triplet_mask and triplets; give one form of the triplets")
            positives, mask = self.triplet_mask
            if positives.dtype != torch.long or positives.dim() != 2 or len(positives) != n_query:
                raise ValueError(f"Mined.triplet_mask.positives must be int64 [{n_query}, K], got {positives.dtype} {tuple(positives.shape)}")
            if mask.shape != (*positives.shape, n_ref):
                raise ValueError(f"Mined.triplet_mask.mask has shape {tuple(mask.shape)}; expected [{n_query}, {positives.shape[1]}, {n_ref}]")
            if positives.numel() and (int(positives.min()) < 0 or int(positives.max()) >= n_ref):
                raise ValueError(f"Mined.triplet_mask.positives indexes outside the reference set of size {n_ref}")
            _check_mask_values(mask, "triplet_mask.mask")
        if self.mix is not None:
            self.mix.validate(n_query, n_ref)

    def _device(self) -> torch.device:
        for group in (self.pos_pairs, self.neg_pairs, self.triplets, (self.pos_mask,), (self.neg_mask,), self.triplet_mask):
            if group is not None and group[0] is not None:
                return group[0].device
        return self.mix.anchors.device if self.mix is not None else torch.device("cpu")
