"""The one distance object that a miner and a loss share.

A distance turns two sets of embeddings into a matrix ``[N, M]``. It knows whether larger means
closer (``is_inverted``, as for cosine similarity) so that miners and losses written once work for
both. Semantics follow pytorch-metric-learning's ``distances`` module so that its users can swap
libraries without surprises: ``LpDistance(normalize_embeddings=True)`` is the default of every
miner and loss, and ``margin(x, y)`` is ``x - y`` for a distance and ``y - x`` for a similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BaseDistance(nn.Module):
    """A pairwise distance or similarity matrix with an optional L2 normalisation first.

    Args:
        normalize_embeddings: L2-normalise both inputs before comparing them.
        p: the norm used for normalisation (and, for ``LpDistance``, the distance).
        power: raise every entry of the matrix to this power.
        is_inverted: True when larger values mean "closer" (a similarity).
    """

    def __init__(
        self,
        normalize_embeddings: bool = True,
        p: float = 2,
        power: float = 1,
        is_inverted: bool = False,
    ) -> None:
        super().__init__()
        self.normalize_embeddings = normalize_embeddings
        self.p = p
        self.power = power
        self.is_inverted = is_inverted

    def forward(self, query_emb: Tensor, ref_emb: Tensor | None = None) -> Tensor:
        """``query_emb: [N, D]``, ``ref_emb: [M, D]`` (default: ``query_emb``) -> ``[N, M]``."""
        q = self.maybe_normalize(query_emb)
        r = q if ref_emb is None else self.maybe_normalize(ref_emb)
        mat = self.compute_mat(q, r)
        return mat if self.power == 1 else mat**self.power

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        raise NotImplementedError

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        """Row-wise distance between two aligned sets ``[N, D], [N, D] -> [N]``."""
        raise NotImplementedError

    def pairwise(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        """Like ``forward`` but for aligned rows: normalises, compares row i with row i, applies power."""
        d = self.pairwise_distance(self.maybe_normalize(query_emb), self.maybe_normalize(ref_emb))
        return d if self.power == 1 else d**self.power

    def maybe_normalize(self, emb: Tensor, dim: int = 1) -> Tensor:
        return F.normalize(emb, p=self.p, dim=dim) if self.normalize_embeddings else emb

    def margin(self, x: Tensor, y: Tensor) -> Tensor:
        """How much closer ``x`` is than ``y``, negated: ``x - y`` for distances, ``y - x`` for similarities."""
        return y - x if self.is_inverted else x - y

    def closest(self, mat: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Values and indices of the closest entry along ``dim``."""
        return mat.max(dim=dim) if self.is_inverted else mat.min(dim=dim)

    def farthest(self, mat: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Values and indices of the farthest entry along ``dim``."""
        return mat.min(dim=dim) if self.is_inverted else mat.max(dim=dim)

    def worst_value(self, mat: Tensor) -> float:
        """A value farther than anything ``mat`` can hold, used to mask entries out of a closest-search."""
        return float("-inf") if self.is_inverted else float("inf")

    def best_value(self, mat: Tensor) -> float:
        """A value closer than anything ``mat`` can hold, used to mask entries out of a farthest-search."""
        return float("inf") if self.is_inverted else float("-inf")

    def extra_repr(self) -> str:
        return f"normalize_embeddings={self.normalize_embeddings}, p={self.p}, power={self.power}"


class LpDistance(BaseDistance):
    """The Lp distance ``||x - y||_p`` (Euclidean for ``p=2``)."""

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1) -> None:
        super().__init__(normalize_embeddings=normalize_embeddings, p=p, power=power, is_inverted=False)

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        if query_emb.dtype in (torch.float16, torch.bfloat16):
            # cdist has no half kernels on CPU; compute in float32 and return in the input dtype.
            return torch.cdist(query_emb.float(), ref_emb.float(), p=self.p).to(query_emb.dtype)
        return torch.cdist(query_emb, ref_emb, p=self.p)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return torch.linalg.vector_norm(query_emb - ref_emb, ord=self.p, dim=-1)


class CosineSimilarity(BaseDistance):
    """Cosine similarity ``x.y / (|x| |y|)``; larger is closer (``is_inverted=True``)."""

    def __init__(self, power: float = 1) -> None:
        super().__init__(normalize_embeddings=True, p=2, power=power, is_inverted=True)

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return query_emb @ ref_emb.t()

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return (query_emb * ref_emb).sum(dim=-1)


class DotProductSimilarity(BaseDistance):
    """The raw inner product ``x.y`` without normalisation; larger is closer."""

    def __init__(self, power: float = 1) -> None:
        super().__init__(normalize_embeddings=False, p=2, power=power, is_inverted=True)

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return query_emb @ ref_emb.t()

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return (query_emb * ref_emb).sum(dim=-1)
