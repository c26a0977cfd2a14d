"""``MoCHi``: synthetic hard negatives mixed from each query's hardest memory entries."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.mix_spec import MixSpec


class MoCHi(nn.Module):
    """Hard negative mixing: per query, synthetic negatives mixed from its ``N`` hardest queue entries.

    Kalantidis, Sariyildiz, Pion, Weinzaepfel, Larlus, "Hard Negative Mixing for Contrastive
    Learning" (NeurIPS 2020), Sec. 4. With ``q`` and the queue ``Q`` L2-normalised, let
    ``Q~^N(q)`` be the ``N`` entries of ``Q`` most similar to ``q`` (computed without gradient).
    For every query, independently:

    - "mixing the hardest negatives", ``s`` points of type 1:
      ``h = normalize(alpha * n_i + (1 - alpha) * n_j)`` with ``n_i != n_j`` drawn uniformly from
      ``Q~^N(q)`` and ``alpha ~ U(0, 1)``;
    - "mixing for even harder negatives", ``s'`` points of type 2:
      ``h' = normalize(beta * q + (1 - beta) * n_j)`` with ``n_j`` drawn uniformly from ``Q~^N(q)``,
      ``beta ~ U(0, 0.5)`` and ``q`` detached.

    Their logits ``q . h / tau`` are appended to the negatives of the MoCo/InfoNCE loss. The
    synthetic points are constants (no gradient flows through them, to the queue or back to ``q``)
    and are never enqueued. Since ``beta < 0.5``, ``q . h' >= q . n_j`` whenever ``q . n_j >= 0``:
    type 2 points are harder than the entry they come from.

    With labels (a supervised memory, as in XBM), entries sharing the query's label are not
    negatives and are excluded before taking the top ``N``. A query with fewer candidates uses
    all it has (the queue may hold fewer than ``N`` entries early on).

    Usage: ``MoCHi(n_hard, s, s_prime)(q, queue_emb) -> [B, s + s', D]`` (type 1 first), or
    ``mix_spec(...)`` for the ``Mined.mix`` a loss consumes (``miners.MoCHiMiner`` with
    ``CrossBatchMemory``; ``lightning_modules.moco_module.MoCoModule``).

    Args:
        n_hard: ``N``, the hardest queue entries mixed per query (paper: 1024 with a 16k queue).
        s: type-1 points per query (mixes of two hard negatives).
        s_prime: type-2 points per query (mixes of the query with a hard negative).
        warmup_epochs: no synthetic points before this epoch (``set_epoch`` is called at every
            epoch start by ``MoCoModule`` or by the ``experiments.callbacks.SetEpoch`` callback).
    """

    def __init__(self, n_hard: int = 1024, s: int = 1024, s_prime: int = 512, warmup_epochs: int = 0) -> None:
        super().__init__()
        for name, value, low in (("n_hard", n_hard, 1), ("s", s, 0), ("s_prime", s_prime, 0), ("warmup_epochs", warmup_epochs, 0)):
            if int(value) != value or value < low:
                raise ValueError(f"MoCHi: {name}={value!r}; expected an integer >= {low}")
        if s > 0 and n_hard < 2:
            raise ValueError(f"MoCHi: type-1 points mix two distinct hard negatives, so n_hard must be >= 2 when s > 0 (got {n_hard})")
        self.n_hard, self.s, self.s_prime, self.warmup_epochs = int(n_hard), int(s), int(s_prime), int(warmup_epochs)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Tell MoCHi the current epoch (mixing starts at ``warmup_epochs``)."""
        self.epoch = int(epoch)

    @property
    def active(self) -> bool:
        return self.epoch >= self.warmup_epochs and self.s + self.s_prime > 0

    @torch.no_grad()
    def hardest(
        self, q: Tensor, queue_emb: Tensor, labels: Tensor | None = None, queue_labels: Tensor | None = None,
        candidates: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Each query's ``min(N, M)`` most similar entries: indices ``[B, n]`` into the queue, and how many are valid ``[B]``.

        Valid entries come first; with labels, entries of the query's label are not valid; with
        ``candidates: [B, M]`` bool (the negatives of a relevance mask), only those entries are.
        """
        sim = F.normalize(q.detach(), dim=1) @ F.normalize(queue_emb.detach(), dim=1).T
        n = min(self.n_hard, sim.shape[1])
        if labels is not None:
            same = labels.to(sim.device).unsqueeze(1) == queue_labels.to(sim.device).unsqueeze(0)
            sim = sim.masked_fill(same, float("-inf"))
        if candidates is not None:
            sim = sim.masked_fill(~candidates.to(sim.device), float("-inf"))
        values, index = sim.topk(n, dim=1)
        return index, torch.isfinite(values).sum(dim=1)

    @torch.no_grad()
    def mix_spec(
        self, q: Tensor, queue_emb: Tensor, labels: Tensor | None = None, queue_labels: Tensor | None = None,
        *, candidates: Tensor | None = None,
    ) -> MixSpec:
        """The synthetic negatives as a ``MixSpec`` (``pos_weight`` 0, detached, normalised).

        ``q: [B, D]`` queries, ``queue_emb: [M, D]`` the queue (the loss's reference set, or its first
        ``M`` rows); ``labels: [B]`` / ``queue_labels: [M]`` for a supervised memory, or
        ``candidates: [B, M]`` bool, the entries each query may mix (its negatives). Type 1 points
        mix two queue rows (``first`` indexes ``cat([q, queue])``: source "both"); type 2 points mix
        query row ``b`` with a queue row. Points are ordered type 1 then type 2, each query by query;
        a query without enough candidates (2 for type 1, 1 for type 2) gets none of that type.
        """
        if (labels is None) != (queue_labels is None):
            raise ValueError("MoCHi: labels and queue_labels must be given together")
        if q.dim() != 2 or queue_emb.dim() != 2 or q.shape[1] != queue_emb.shape[1]:
            raise ValueError(f"MoCHi: q has shape {tuple(q.shape)} and queue_emb {tuple(queue_emb.shape)}; expected [B, D] and [M, D]")
        if candidates is not None and tuple(candidates.shape) != (len(q), len(queue_emb)):
            raise ValueError(f"MoCHi: candidates has shape {tuple(candidates.shape)}; expected {(len(q), len(queue_emb))}")
        device, b = q.device, len(q)
        empty = torch.empty(0, dtype=torch.long, device=device)
        if not self.active or b == 0 or len(queue_emb) == 0:
            return _spec(empty, empty, empty, torch.empty(0, device=device))
        index, count = self.hardest(q, queue_emb, labels, queue_labels, candidates)
        rows = torch.arange(b, device=device)

        # type 1: i != j uniform among the row's valid entries (j drawn from the others, shifted past i)
        ok1 = count >= 2
        c1 = count.clamp(min=2).unsqueeze(1)
        i = _uniform_int(c1, (b, self.s), device)
        j = _uniform_int(c1 - 1, (b, self.s), device)
        j = j + (j >= i).long()
        top = index.shape[1] - 1  # rows with fewer than 2 candidates are dropped below; keep their gather in range
        i, j = i.clamp(max=top), j.clamp(max=top)
        anchors1 = rows.unsqueeze(1).expand(b, self.s)
        first1 = b + index.gather(1, i)  # "both" source: queue row r is row b + r
        second1 = index.gather(1, j)
        alpha = torch.rand(b, self.s, device=device, dtype=q.dtype)

        # type 2: the (detached) query itself with one valid entry, beta < 0.5
        ok2 = count >= 1
        j2 = _uniform_int(count.clamp(min=1).unsqueeze(1), (b, self.s_prime), device)
        anchors2 = rows.unsqueeze(1).expand(b, self.s_prime)
        second2 = index.gather(1, j2)
        beta = 0.5 * torch.rand(b, self.s_prime, device=device, dtype=q.dtype)

        keep1 = ok1.unsqueeze(1).expand(b, self.s).reshape(-1)
        keep2 = ok2.unsqueeze(1).expand(b, self.s_prime).reshape(-1)
        anchors = torch.cat([anchors1.reshape(-1)[keep1], anchors2.reshape(-1)[keep2]])
        first = torch.cat([first1.reshape(-1)[keep1], anchors2.reshape(-1)[keep2]])
        second = torch.cat([second1.reshape(-1)[keep1], second2.reshape(-1)[keep2]])
        coeff = torch.cat([alpha.reshape(-1)[keep1], beta.reshape(-1)[keep2]])
        return _spec(anchors, first, second, coeff)

    def forward(self, q: Tensor, queue_emb: Tensor, labels: Tensor | None = None, queue_labels: Tensor | None = None) -> Tensor:
        """``[B, s + s', D]`` detached unit-norm synthetic negatives of each query, type 1 first (``[B, 0, D]`` in warm-up)."""
        spec = self.mix_spec(q, queue_emb, labels, queue_labels)
        b, d = q.shape
        if not self.active:
            return q.new_zeros(b, 0, d)
        if len(spec) != b * (self.s + self.s_prime):
            raise ValueError(
                f"MoCHi: some queries have fewer than 2 candidate negatives among {len(queue_emb)} queue entries "
                f"(after excluding same-label entries); use mix_spec(), which skips them, or a fuller queue"
            )
        points = spec.materialize(q, queue_emb)
        n1 = b * self.s
        return torch.cat([points[:n1].view(b, self.s, d), points[n1:].view(b, self.s_prime, d)], dim=1)


def _uniform_int(high: Tensor, shape: tuple[int, int], device: torch.device) -> Tensor:
    """Integers uniform in ``[0, high)`` per row (``high: [B, 1]``, at least 1)."""
    u = torch.rand(shape, device=device, dtype=torch.float64)
    return torch.minimum((u * high).long(), high - 1)


def _spec(anchors: Tensor, first: Tensor, second: Tensor, coeff: Tensor) -> MixSpec:
    return MixSpec(
        anchors=anchors, first=first, second=second, coeff=coeff, pos_weight=torch.zeros_like(coeff),
        first_source="both", second_source="ref", normalize=True, detach=True,
    )
