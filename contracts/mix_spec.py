"""``MixSpec``: synthetic points (MoCHi, Metrix) as convex combinations of existing rows, carried in ``Mined.mix``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MixSpec:
    """Synthetic points defined as convex combinations of two existing rows.

    Synthetic point ``m`` is ``coeff[m] * first[m] + (1 - coeff[m]) * second[m]``, where ``first``
    and ``second`` index rows of the set named by ``first_source`` / ``second_source``: "query" for
    ``emb``, "ref" for the reference set, "both" for ``torch.cat([emb, ref_emb])`` (query rows
    first; MoCHi mixes a query with its queue entries). Point ``m`` is compared with query row
    ``anchors[m]``; ``pos_weight[m]`` in [0, 1] is its soft label: how much it counts as a positive
    of that anchor (0 for a pure synthetic negative, as in MoCHi; ``lambda`` for a Metrix mix).

    ``points`` (optional, ``[M, D]``): the synthetic embeddings when they were computed elsewhere,
    e.g. Metrix mixes images or backbone features and embeds the mix; ``first``/``second``/``coeff``
    then still say which rows were mixed and how (their labels give the soft labels). Without
    ``points``, ``materialize`` mixes the embeddings (L2-normalised when ``normalize``).

    ``detach``: whether the points are constants (MoCHi: no gradient reaches the queue or the
    query through them) or carry gradient (Metrix). ``materialize`` honours it.
    """

    anchors: Tensor
    first: Tensor
    second: Tensor
    coeff: Tensor
    pos_weight: Tensor
    first_source: str = "ref"
    second_source: str = "ref"
    normalize: bool = True
    detach: bool = True
    points: Tensor | None = None

    SOURCES = ("query", "ref", "both")

    def __post_init__(self) -> None:
        n = len(self.anchors)
        for name in ("first", "second", "coeff", "pos_weight"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"MixSpec.{name} has {len(getattr(self, name))} entries; expected {n} (one per anchor)")
        for name in ("first_source", "second_source"):
            if getattr(self, name) not in self.SOURCES:
                raise ValueError(f"MixSpec.{name} must be one of {self.SOURCES}, got {getattr(self, name)!r}")
        if self.points is not None and (self.points.dim() != 2 or len(self.points) != n):
            raise ValueError(f"MixSpec.points has shape {tuple(self.points.shape)}; expected [{n}, D] (one point per anchor)")

    def __len__(self) -> int:
        return len(self.anchors)

    def rows(self, which: str, query: Tensor, ref: Tensor | None = None) -> Tensor:
        """The rows ``which`` ("first" or "second") points at, taken from ``query`` / ``ref`` (embeddings or labels)."""
        ref = query if ref is None else ref
        source = getattr(self, f"{which}_source")
        table = {"query": query, "ref": ref}.get(source)
        if table is None:
            table = torch.cat([query, ref.to(query.device)])
        return table[getattr(self, which)]

    def materialize(self, emb: Tensor, ref_emb: Tensor | None = None, detach: bool | None = None) -> Tensor:
        """Return the synthetic points ``[M, D]``: ``points`` as given, else the mixes (normalised when ``normalize``).

        ``detach``: ``None`` follows the spec's ``detach``.
        """
        detach = self.detach if detach is None else detach
        if self.points is not None:
            return self.points.detach() if detach else self.points
        a = self.rows("first", emb, ref_emb)
        b = self.rows("second", emb, ref_emb)
        c = self.coeff.to(a.dtype).unsqueeze(1)
        mixed = c * a + (1 - c) * b
        if self.normalize:
            mixed = F.normalize(mixed, dim=1)
        return mixed.detach() if detach else mixed

    def validate(self, n_query: int, n_ref: int) -> None:
        """Raise ``ValueError`` if an index is out of range or a soft label is outside [0, 1]."""
        bounds = {"query": n_query, "ref": n_ref, "both": n_query + n_ref}
        for name, source in (("anchors", "query"), ("first", self.first_source), ("second", self.second_source)):
            t = getattr(self, name)
            if t.dtype != torch.long or t.dim() != 1:
                raise ValueError(f"MixSpec.{name} must be a 1-D int64 tensor, got {t.dtype} {tuple(t.shape)}")
            if len(t) and (int(t.min()) < 0 or int(t.max()) >= bounds[source]):
                raise ValueError(f"MixSpec.{name} indexes outside its {source} set of size {bounds[source]}")
        if len(self) and (bool((self.pos_weight < 0).any()) or bool((self.pos_weight > 1).any())):
            raise ValueError(f"MixSpec.pos_weight must be in [0, 1], got range [{float(self.pos_weight.min())}, {float(self.pos_weight.max())}]")
