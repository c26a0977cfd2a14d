"""``EmbeddingStore``: the torchmetrics base that accumulates embeddings and scores them sharded.

States (``emb``, ``labels``, optional sample ``index``, and ``is_query`` for query/gallery) are
``cat`` list states. With ``sharded=True`` (the default) ``compute()`` does not let torchmetrics
gather them: only the small per-row metadata (labels, index, query flags: a few bytes per row) is
all-gathered, each rank keeps its own embeddings as its shard of the reference set, and the search
runs across ranks (:mod:`~lightning_modules.metrics.sharded`). Every rank returns the same numbers,
equal to one process that saw every row. ``sharded=False`` restores the gather-everything path
(every rank holds every embedding and computes alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from contracts.index import IndexKind
from lightning_modules.metrics.inputs import Distance, check_distance, check_ks, check_update
from lightning_modules.metrics.sharded import distributed_world


class EmbeddingStore(Metric):
    """Accumulates ``emb``, ``labels`` and an optional sample ``index``; scores them (sharded under DDP)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

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
        if sharded and kwargs.get("sync_on_compute", False):
            raise ValueError("sync_on_compute=True gathers every embedding to every rank; it needs sharded=False")
        if sharded:
            kwargs["sync_on_compute"] = False
        super().__init__(**kwargs)
        check_distance(distance)
        self.ks = check_ks(ks)
        self.nmi = nmi
        self.distance = distance
        self.chunk_size = chunk_size
        self.index_kind = index
        self.sharded = sharded
        self.add_state("emb", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def _store(self, emb: Tensor, labels: Tensor, index: Tensor | None) -> None:
        check_update(emb, labels, index, type(self).__name__)
        if self.labels and (index is None) != (len(self.index) == 0):
            raise ValueError(f"{type(self).__name__}.update: pass index in every update or in none")
        self.emb.append(emb.detach())
        self.labels.append(labels.detach())
        if index is not None:
            self.index.append(index.detach().to(labels.device))

    def _world(self) -> int:
        return distributed_world(self.process_group) if self.sharded else 1

    def _local(self, name: str, dtype: torch.dtype) -> Tensor:
        """This rank's state ``name`` concatenated (empty when this rank saw no rows)."""
        state = getattr(self, name)
        if isinstance(state, list):
            return dim_zero_cat(state).to(dtype) if state else torch.empty(0, dtype=dtype, device=self.device)
        return state.to(dtype)

    def _rows(self) -> tuple[Tensor, Tensor, Tensor | None, np.ndarray]:
        """Local ``emb``, gathered ``labels`` and ``index`` (rank order), and this rank's slice of them.

        The gathered rows are the torchmetrics ``cat`` order: rank 0's rows, then rank 1's, ...
        """
        labels = self._local("labels", torch.long)
        index = self._local("index", torch.long) if len(self.index) else None
        emb = dim_zero_cat(self.emb) if isinstance(self.emb, list) and self.emb else (
            self.emb if isinstance(self.emb, Tensor) else torch.empty(0, 0, device=self.device)
        )
        world = self._world()
        if world > 1:
            parts = gather_all_tensors(labels, self.process_group)
            sizes = [len(p) for p in parts]
            labels_all = torch.cat(parts).cpu()
            index_parts = gather_all_tensors(index if index is not None else labels[:0], self.process_group)
            index_all = torch.cat(index_parts).cpu()
            rank = torch.distributed.get_rank(self.process_group)
            start = sum(sizes[:rank])
            mine = np.arange(start, start + sizes[rank])
        else:
            labels_all, index_all = labels.cpu(), (index.cpu() if index is not None else labels[:0].cpu())
            mine = np.arange(len(labels_all))
        if len(labels_all) == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any update()")
        if len(index_all) == 0:
            index_all = None
        elif len(index_all) != len(labels_all):
            raise ValueError(f"{type(self).__name__}: some ranks passed index and some did not; pass it everywhere")
        return emb.detach().cpu(), labels_all, index_all, mine

    def _all_flags(self, flags: Tensor) -> Tensor:
        if self._world() > 1:
            return torch.cat(gather_all_tensors(flags, self.process_group)).cpu()
        return flags.cpu()


def first_per_key(key: Tensor) -> Tensor:
    """Positions that keep one row per distinct ``key`` (its first occurrence), in key order."""
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    return order[first]


def positions(order: Tensor, n: int) -> np.ndarray:
    """``[n]`` global position of each gathered row given the kept rows in global ``order`` (-1: dropped)."""
    pos = np.full(n, -1, dtype=np.int64)
    pos[order.numpy()] = np.arange(len(order))
    return pos


def cat_long_state(state: list[Tensor] | Tensor, device: torch.device) -> Tensor:
    """A ``cat`` list state as one long tensor (empty when nothing was added)."""
    if isinstance(state, list):
        return dim_zero_cat(state).long() if state else torch.empty(0, dtype=torch.long, device=device)
    return state.long()
