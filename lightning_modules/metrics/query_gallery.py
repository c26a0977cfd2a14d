"""``QueryGalleryRetrievalMetrics``: separate query and gallery sets (the In-Shop protocol)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from contracts.index import IndexKind
from lightning_modules.metrics.embedding_store import EmbeddingStore, first_per_key, positions
from lightning_modules.metrics.inputs import Distance
from lightning_modules.metrics.retrieval import labelled_scores


class QueryGalleryRetrievalMetrics(EmbeddingStore):
    """The scores of :class:`RetrievalMetrics` with separate query and gallery sets (In-Shop).

    Usage: ``metric.update(emb, labels, is_query, index=None)``, where ``is_query`` is a Python
    bool for a batch that is all queries or all gallery (one dataloader per set: pass
    ``dataloader_idx == 0``), or a bool tensor ``[B]`` for mixed batches. ``compute()`` ranks the
    whole gallery for every query; no row is removed from a ranking, and a query whose label is
    absent from the gallery is lone (left out of the k-NN scores). NMI, when asked for, clusters
    the queries. Under DDP each rank's gallery rows are its shard; every rank's queries are searched
    against every shard and the top-k lists merged.

    DDP duplicates: pass ``index`` as in :class:`RetrievalMetrics`; query and gallery indices are
    separate name spaces (the pair ``(is_query, index)`` identifies a row), so two dataloaders
    may each count from 0.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8),
        nmi: bool = False,
        distance: Distance = "cosine",
        chunk_size: int = 4096,
        index: IndexKind = "flat",
        sharded: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(ks=ks, nmi=nmi, distance=distance, chunk_size=chunk_size, index=index, sharded=sharded, **kwargs)
        self.add_state("is_query", default=[], dist_reduce_fx="cat")

    def update(self, emb: Tensor, labels: Tensor, is_query: bool | Tensor, index: Tensor | None = None) -> None:
        """Add a batch: ``emb: [B, D]``, ``labels: [B]``, ``is_query``: bool or bool ``[B]``, optional ``index: [B]``."""
        if isinstance(is_query, bool):
            flag = torch.full((len(labels),), is_query, dtype=torch.bool, device=labels.device)
        elif isinstance(is_query, Tensor) and is_query.dtype == torch.bool and is_query.shape in ((), (len(labels),)):
            flag = is_query.detach().to(labels.device).expand(len(labels)).clone()
        else:
            raise ValueError(
                f"{type(self).__name__}.update: is_query must be a bool or a bool tensor [B] with B = {len(labels)}, "
                f"got {is_query!r:.80}"
            )
        self._store(emb, labels, index)
        self.is_query.append(flag)

    def compute(self) -> dict[str, float]:
        emb, labels_all, index_all, mine = self._rows()
        is_query = self._all_flags(self._local("is_query", torch.bool))
        if index_all is not None:
            order = first_per_key(index_all * 2 + is_query.long())
        else:
            order = torch.arange(len(labels_all))
        q_order, g_order = order[is_query[order]], order[~is_query[order]]
        if len(q_order) == 0 or len(g_order) == 0:
            raise ValueError(
                f"{type(self).__name__}.compute: need both query and gallery rows, got "
                f"{len(q_order)} queries and {len(g_order)} gallery rows"
            )
        q_pos = positions(q_order, len(labels_all))[mine]
        g_pos = positions(g_order, len(labels_all))[mine]
        q_rows, g_rows = torch.from_numpy(q_pos >= 0), torch.from_numpy(g_pos >= 0)
        return labelled_scores(
            emb[q_rows], labels_all[q_order], q_pos[q_pos >= 0], emb[g_rows], labels_all[g_order], g_pos[g_pos >= 0],
            self.ks, self.nmi, self.distance, self.chunk_size, seed=1234, index=self.index_kind,
            group=self.process_group, distributed=self._world() > 1,
        )
