"""``RetrievalMetrics``: a set retrieving from itself (the CUB-200 / Cars196 / SOP protocol)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.metrics.embedding_store import EmbeddingStore, first_per_key, positions
from lightning_modules.metrics.retrieval import labelled_scores


class RetrievalMetrics(EmbeddingStore):
    """Recall@K, Precision@1, R-Precision, MAP@R (and NMI) of a set retrieving from itself.

    Every embedding is a query against all the others (its own row removed); see
    :func:`~lightning_modules.metrics.retrieval_metrics` for the definitions and the lone-query rule.

    Usage: ``metric.update(emb, labels)`` per batch (``emb: [B, D]``, ``labels: [B]``), then
    ``metric.compute()`` returns a dict of Python floats, the same on every rank. Under DDP each
    rank's embeddings stay on that rank as its shard of the reference set (see
    :class:`~lightning_modules.metrics.embedding_store.EmbeddingStore`); ``compute()`` is collective.

    DDP duplicates: ``DistributedSampler(drop_last=False)`` pads the last shard by repeating
    samples, which would count them twice. Pass ``index`` (``[B]``, the dataset index of each row)
    in every ``update`` and ``compute`` keeps one row per index (the first gathered) and orders rows
    by index, so the result equals a single process that saw the dataset once, in order.
    """

    def update(self, emb: Tensor, labels: Tensor, index: Tensor | None = None) -> None:
        """Add a batch: ``emb: [B, D]``, ``labels: [B]``, optional ``index: [B]`` dataset indices."""
        self._store(emb, labels, index)

    def compute(self) -> dict[str, float]:
        emb, labels_all, index_all, mine = self._rows()
        order = first_per_key(index_all) if index_all is not None else torch.arange(len(labels_all))
        pos = positions(order, len(labels_all))[mine]
        kept = pos >= 0
        return labelled_scores(
            emb[torch.from_numpy(kept)] if not kept.all() else emb, labels_all[order], pos[kept], None, None, None,
            self.ks, self.nmi, self.distance, self.chunk_size, seed=1234, index=self.index_kind,
            group=self.process_group, distributed=self._world() > 1,
        )
