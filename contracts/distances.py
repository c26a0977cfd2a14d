"""The one distance object that a miner and a loss share.

A distance turns two sets of embeddings into a matrix ``[N, M]``. It knows whether larger means
closer (``is_inverted``, as for cosine similarity) so that miners and losses written once work for
both. Semantics follow pytorch-metric-learning's ``distances`` module so that its users can swap
libraries without surprises: ``LpDistance(normalize_embeddings=True)`` is the default of every
miner and loss, and ``margin(x, y)`` is ``x - y`` for a distance and ``y - x`` for a similarity.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.dtypes import work_dtype


def _tensor_key(t: Tensor) -> tuple:
    """What identifies a tensor's current contents: its memory, layout and in-place version."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, t._version)


@dataclass(frozen=True, eq=False)
class ComputedMatrix:
    """A distance matrix computed without gradient (by a miner), for a loss to reuse.

    A miner and a loss on the same batch compute the same ``[B, M]`` matrix: the miner without
    gradient, the loss with it. The loss can skip its forward matmul and only run the backward one
    when it is handed the miner's matrix (``BaseDistance.reusing``). The record keeps the (detached)
    inputs it was computed from, so their memory cannot be reused by another tensor while it
    lives, and their in-place version, so a changed input is never matched.

    Fields:
        signature: the distance's class and settings (``BaseDistance.signature``).
        query, ref: the raw inputs (``ref`` None when compared with itself).
        keys: ``_tensor_key`` of ``query``, ``ref`` and ``value`` at the time of computing (a miner
            that edits its matrix in place invalidates the record).
        value: ``compute_mat`` of the normalised inputs, before ``power``.
    """

    signature: tuple
    query: Tensor
    ref: Tensor | None
    keys: tuple
    value: Tensor

    @classmethod
    def record(cls, signature: tuple, query: Tensor, ref: Tensor | None, value: Tensor) -> "ComputedMatrix":
        keys = (_tensor_key(query), _tensor_key(query if ref is None else ref), _tensor_key(value))
        return cls(signature, query.detach(), None if ref is None else ref.detach(), keys, value)

    def matches(self, signature: tuple, query: Tensor, ref: Tensor | None) -> bool:
        """Whether this is the matrix of ``query`` against ``ref`` (None: itself) under ``signature``."""
        if signature != self.signature or _tensor_key(query) != self.keys[0] or _tensor_key(self.value) != self.keys[2]:
            return False
        ref = query if ref is None else ref
        return _tensor_key(ref) == self.keys[1]


class _DistanceMatrix(torch.autograd.Function):
    """``distance.compute_mat(q, r)`` with the distance's analytic backward (``mat_backward``).

    ``value``, when given, is the already known matrix (a miner's): forward returns it without
    computing. ``r=None`` compares ``q`` with itself; the backward then runs one product instead of
    two: for a symmetric distance, the gradient of ``sum(G * d(q, q))`` w.r.t. ``q`` is that of the
    first argument alone under ``G + G.T``.
    """

    @staticmethod
    def forward(ctx, q: Tensor, r: Tensor | None, value: Tensor | None, distance: "BaseDistance") -> Tensor:
        ctx.distance, ctx.same = distance, r is None
        out = distance.compute_mat(q, q if r is None else r) if value is None else value.view_as(value)
        ctx.save_for_backward(q, q if r is None else r, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, r, value = ctx.saved_tensors
        grad = _sparse_if_mostly_zero(grad)
        if ctx.same:
            grad = (grad + grad.t()).coalesce() if grad.is_sparse else grad + grad.t()
            grad_q, _ = ctx.distance.mat_backward(q, q, value, grad, (True, False))
            return grad_q, None, None, None
        grad_q, grad_r = ctx.distance.mat_backward(q, r, value, grad, ctx.needs_input_grad[:2])
        return grad_q, grad_r, None, None


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
        self._records: list[ComputedMatrix] | None = None
        self._reuse: tuple[ComputedMatrix, ...] = ()

    def forward(self, query_emb: Tensor, ref_emb: Tensor | None = None) -> Tensor:
        """``query_emb: [N, D]``, ``ref_emb: [M, D]`` (default: ``query_emb``) -> ``[N, M]``."""
        same = ref_emb is None or ref_emb is query_emb
        q = self.maybe_normalize(query_emb)
        r = q if same else self.maybe_normalize(ref_emb)
        reuse = next((c.value for c in self._reuse if c.matches(self.signature(), query_emb, ref_emb)), None)
        if self.reusable and torch.is_grad_enabled() and (q.requires_grad or r.requires_grad):
            mat = _DistanceMatrix.apply(q, None if same else r, reuse, self)
        elif reuse is not None:
            mat = reuse
        else:
            mat = self.compute_mat(q, r)
            if self._records is not None and not mat.requires_grad:
                self._records.append(ComputedMatrix.record(self.signature(), query_emb, ref_emb, mat))
        return mat if self.power == 1 else mat**self.power

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ reuse of a miner's matrix
    def signature(self) -> tuple:
        """The class and settings that determine ``compute_mat`` (two distances with equal signatures agree)."""
        return (type(self), self.normalize_embeddings, self.p)

    @property
    def reusable(self) -> bool:
        """Whether this distance can back-propagate through a matrix it did not compute (``mat_backward``)."""
        return type(self).mat_backward is not BaseDistance.mat_backward

    def mat_backward(
        self, query_emb: Tensor, ref_emb: Tensor, mat: Tensor, grad: Tensor, needs: tuple[bool, bool]
    ) -> tuple[Tensor | None, Tensor | None]:
        """Gradients of ``sum(grad * compute_mat(q, r))`` w.r.t. ``q`` and ``r``, given ``mat = compute_mat(q, r)``.

        ``grad`` is dense, or a coalesced sparse COO matrix when mostly zero (losses that touch few
        pairs). A subclass that implements it lets a loss reuse a miner's matrix (``reusing``).
        """
        raise NotImplementedError

    @contextmanager
    def recording(self) -> Iterator[list[ComputedMatrix]]:
        """Within the block, matrices computed without gradient are appended to the yielded list."""
        previous, self._records = self._records, ([] if self.reusable else None)
        try:
            yield self._records if self._records is not None else []
        finally:
            self._records = previous

    @contextmanager
    def reusing(self, computed: tuple[ComputedMatrix, ...]) -> Iterator[None]:
        """Within the block, a call on the very inputs one of ``computed`` was made from returns its value.

        The returned matrix carries gradient: only the backward product runs (``mat_backward``), so a
        loss after a miner costs one ``B x M`` matmul less. Any other call computes as usual.
        """
        previous = self._reuse
        self._reuse = tuple(computed) if self.reusable else ()
        try:
            yield
        finally:
            self._reuse = previous

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
        # cdist has no half kernels on CPU; half inputs are compared in float32, returned in their dtype.
        work = work_dtype(query_emb.dtype)
        return torch.cdist(query_emb.to(work), ref_emb.to(work), p=self.p).to(query_emb.dtype)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        if self.p != 2:
            return torch.linalg.vector_norm(query_emb - ref_emb, ord=self.p, dim=-1)
        # sqrt of the summed squares: its backward is two [N, D] passes, vector_norm's about five.
        # Zero distances stay 0 with a zero gradient (as cdist), through the where below.
        diff = (query_emb - ref_emb).to(work_dtype(query_emb.dtype))  # squares of half values overflow early
        squared = (diff * diff).sum(dim=-1)
        positive = squared > 0
        return torch.where(positive, squared.where(positive, 1.0).sqrt(), 0.0).to(query_emb.dtype)

    @property
    def reusable(self) -> bool:
        return self.p == 2

    def mat_backward(self, query_emb, ref_emb, mat, grad, needs):
        """``d_ij = |q_i - r_j|``: ``dd_ij/dq_i = (q_i - r_j) / d_ij`` (0 where ``d_ij = 0``, as ``torch.cdist``)."""
        work = work_dtype(mat.dtype)
        q, r = query_emb.to(work), ref_emb.to(work)
        if grad.is_sparse:  # only the non-zero entries: G_ij / d_ij, and its row and column sums
            rows, cols = grad.indices()
            d = mat[rows, cols].to(work)
            w = torch.where(d > 0, grad.values().to(work) / d, 0.0)
            g = torch.sparse_coo_tensor(grad.indices(), w, grad.shape, is_coalesced=True, check_invariants=False)
            row_sum = torch.zeros(len(q), dtype=work, device=q.device).index_add_(0, rows, w).unsqueeze(1)
            col_sum = torch.zeros(len(r), dtype=work, device=r.device).index_add_(0, cols, w).unsqueeze(1)
        else:
            g = torch.where(mat > 0, grad.to(work) / mat.to(work), 0.0)
            row_sum, col_sum = g.sum(dim=1, keepdim=True), g.sum(dim=0).unsqueeze(1)
        gr, gq = _inner_product_backward(q, r, g, needs)
        grad_q = (q * row_sum - gr).to(query_emb.dtype) if needs[0] else None
        grad_r = (r * col_sum - gq).to(ref_emb.dtype) if needs[1] else None
        return grad_q, grad_r


class _InnerProduct(BaseDistance):
    """A similarity computed as an inner product (of normalised embeddings when the subclass says so)."""

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return query_emb @ ref_emb.t()

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return (query_emb * ref_emb).sum(dim=-1)

    def mat_backward(self, query_emb, ref_emb, mat, grad, needs):
        return _inner_product_backward(query_emb, ref_emb, grad, needs)


class CosineSimilarity(_InnerProduct):
    """Cosine similarity ``x.y / (|x| |y|)``; larger is closer (``is_inverted=True``)."""

    def __init__(self, power: float = 1) -> None:
        super().__init__(normalize_embeddings=True, p=2, power=power, is_inverted=True)


class DotProductSimilarity(_InnerProduct):
    """The raw inner product ``x.y`` without normalisation; larger is closer."""

    def __init__(self, power: float = 1) -> None:
        super().__init__(normalize_embeddings=False, p=2, power=power, is_inverted=True)


#: below this share of non-zero entries the gradient of a matrix is multiplied as a sparse matrix (on
#: CPU; GPUs keep the dense product, where the crossover was not measured). Losses that touch few
#: pairs (batch-hard, top-k, margin-mined pairs) leave most of it zero; measured on CPU at
#: B = M = 2048, D = 512, sparse products win below about 5% (dense: ~60 ms each).
SPARSE_GRAD_DENSITY = 0.03


def _sparse_if_mostly_zero(grad: Tensor) -> Tensor:
    """``grad`` as a coalesced sparse COO matrix when at most ``SPARSE_GRAD_DENSITY`` of it is non-zero (CPU float)."""
    if grad.device.type != "cpu" or grad.dtype not in (torch.float32, torch.float64):  # crossover measured on CPU only
        return grad
    if int(torch.count_nonzero(grad)) > SPARSE_GRAD_DENSITY * grad.numel():
        return grad
    return grad.to_sparse()


def _inner_product_backward(q: Tensor, r: Tensor, grad: Tensor, needs: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``sum(grad * (q @ r.T))``: ``grad @ r`` and ``grad.T @ q``, as sparse products for a sparse ``grad``."""
    if grad.is_sparse:
        return (torch.sparse.mm(grad, r) if needs[0] else None), (torch.sparse.mm(grad.t(), q) if needs[1] else None)
    return (grad @ r if needs[0] else None), (grad.t() @ q if needs[1] else None)
