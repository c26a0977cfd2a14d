"""Batch construction as mining: the batch-sampler factory contract, the class-balanced P x K batch sampler and
the uniformly random batch sampler of query/document training."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Sampler


class BatchSamplerFactory(Protocol):
    """What a DataModule's ``batch_sampler`` argument is: called once per rank with the train labels
    and this process's place in DDP, it returns the rank's batch sampler (an iterable of index lists
    with ``__len__``; a ``set_epoch(epoch)`` method is called each epoch when present).

    Every rank must build batches of the same structure over disjoint shards, deterministically from
    ``seed`` (no communication). A sampler class whose constructor takes ``labels`` first and
    ``rank``, ``world_size``, ``seed`` as keywords is such a factory; from YAML it is written as
    ``class_path`` + ``init_args`` (its other arguments), e.g. ``ClassBalancedBatchSampler``.
    Annotate ``labels`` (e.g. ``Sequence[int]``): jsonargparse rejects an untyped mandatory
    parameter when the DataModule itself is given by ``class_path``.
    """

    def __call__(self, labels: Sequence[int], /, *, rank: int, world_size: int, seed: int) -> Sampler: ...


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``P`` classes x ``K`` samples per class, DDP-aware and deterministic for a seed.

    The standard batch construction for batch-hard and other in-batch mining (Hermans et al.,
    "In Defense of the Triplet Loss for Person Re-Identification", 2017, Sec. 3: "PK batches").

    Under DDP every global step draws ``P * world_size`` distinct classes; rank ``r`` takes classes
    ``r*P .. (r+1)*P - 1``, so ranks see disjoint shards with the same P x K structure and the
    gathered global batch is a ``(P * world_size) x K`` batch. Every rank builds the same global
    schedule from ``seed`` and the epoch, so no communication is needed. Within a class, samples are
    drawn without replacement from a per-epoch permutation and reshuffled when exhausted, so an
    epoch visits every sample of a class before repeating one.

    A class with fewer than ``K`` samples is an error unless ``repeat_small_classes``: then its
    ``K`` slots cycle through a permutation of its samples (each appears ``floor(K/n)`` or
    ``ceil(K/n)`` times), as pytorch-metric-learning's ``MPerClassSampler`` and the Metrix code's
    balanced sampler do; SOP and In-Shop have classes of 2-4 images.

    Args:
        labels: the class label of every sample of the dataset.
        classes_per_batch: ``P``.
        samples_per_class: ``K``; every class must have at least ``K`` samples.
        num_batches: batches per epoch per rank; default: dataset size // global batch size.
        seed: the global seed; the epoch is mixed in by ``set_epoch``.
        rank, world_size: this process's place in DDP (``0, 1`` on a single process).
        repeat_small_classes: allow classes with fewer than ``K`` samples (see above).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes_per_batch: int,
        samples_per_class: int,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        repeat_small_classes: bool = False,
    ) -> None:
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(f"ClassBalancedBatchSampler needs P >= 1 and K >= 1, got P={classes_per_batch}, K={samples_per_class}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        classes, counts = np.unique(labels, return_counts=True)
        needed = classes_per_batch * world_size
        if needed > len(classes):
            raise ValueError(
                f"ClassBalancedBatchSampler: a global batch needs {needed} classes (P={classes_per_batch} x "
                f"{world_size} ranks) but the split has only {len(classes)}; lower classes_per_batch"
            )
        small = classes[counts < samples_per_class]
        if len(small) and not repeat_small_classes:
            raise ValueError(
                f"ClassBalancedBatchSampler: K={samples_per_class} samples per class, but {len(small)} classes have fewer "
                f"(e.g. class {small[0]} has {counts[classes == small[0]][0]}); lower samples_per_class, drop those classes "
                f"or pass repeat_small_classes=True"
            )
        self.classes = classes
        self.members = [np.flatnonzero(labels == c) for c in classes]
        self.P, self.K = classes_per_batch, samples_per_class
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        global_batch = self.P * self.K * world_size
        self.num_batches = num_batches if num_batches is not None else max(1, len(labels) // global_batch)
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch sampler itself:
        # without this every epoch would repeat epoch 0's batches.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at each epoch start; every rank reshuffles the same way."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        perms = [rng.permutation(m) for m in self.members]
        cursors = np.zeros(len(self.members), dtype=np.int64)
        lo, hi = self.rank * self.P, (self.rank + 1) * self.P
        for _ in range(self.num_batches):
            chosen = rng.choice(len(self.classes), size=self.P * self.world_size, replace=False)
            batch: list[int] = []
            for slot, c in enumerate(chosen):
                if len(self.members[c]) < self.K:
                    take = np.resize(rng.permutation(self.members[c]), self.K)
                else:
                    if cursors[c] + self.K > len(perms[c]):
                        perms[c] = rng.permutation(self.members[c])
                        cursors[c] = 0
                    take = perms[c][cursors[c] : cursors[c] + self.K]
                    cursors[c] += self.K
                if lo <= slot < hi:
                    batch.extend(int(i) for i in take)
            yield batch


class RandomBatchSampler(Sampler[list[int]]):
    """Uniformly shuffled batches of ``batch_size`` items per rank, DDP-aware and deterministic for a seed.

    The batch construction of in-batch-negative training on query/document data (every other query's
    positive is a negative; Karpukhin et al., "Dense Passage Retrieval for Open-Domain Question
    Answering", EMNLP 2020, Sec. 3.2, "in-batch negatives"), where a batch has no class structure.

    Every global step takes ``batch_size * world_size`` consecutive items of a permutation of the
    dataset drawn from ``(seed, epoch, pass)``; rank ``r`` takes the ``r``-th slice, so ranks see
    disjoint shards of every global batch and the gathered batch is one random batch without a
    repeated item. Every rank builds the same permutation: no communication. With ``drop_last`` the
    incomplete tail of a pass is dropped; without it the last global batch of a pass is completed
    with the first items of the same permutation (so every rank still gets ``batch_size`` items and
    no item appears twice in a global batch). ``num_batches`` beyond one pass starts a new pass with
    a new permutation.

    Args:
        labels_or_size: the dataset size, or a per-item sequence (labels) whose length is the size
            (the ``BatchSamplerFactory`` contract passes the train labels).
        batch_size: items per rank per step.
        rank, world_size: this process's place in DDP (``0, 1`` on a single process).
        seed: the global seed; the epoch is mixed in by ``set_epoch``.
        num_batches: batches per epoch per rank; default: one pass (``size // (batch_size * world_size)``,
            rounded up without ``drop_last``).
        drop_last: see above.
    """

    def __init__(
        self,
        labels_or_size: int | Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int = 32,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_batches: int | None = None,
        drop_last: bool = True,
    ) -> None:
        size = int(labels_or_size) if isinstance(labels_or_size, (int, np.integer)) else len(labels_or_size)
        if batch_size < 1:
            raise ValueError(f"RandomBatchSampler needs batch_size >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        global_batch = batch_size * world_size
        if size < global_batch:
            ranks = f" x {world_size} ranks" if world_size > 1 else ""
            raise ValueError(
                f"RandomBatchSampler: a global batch needs {global_batch} items (batch_size={batch_size}{ranks}) "
                f"but the dataset has only {size}; lower batch_size"
            )
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"RandomBatchSampler: num_batches must be >= 1 or None, got {num_batches}")
        self.size, self.batch_size, self.drop_last = size, batch_size, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_per_pass = size // global_batch if drop_last else -(-size // global_batch)
        self.num_batches = num_batches if num_batches is not None else self.batches_per_pass
        self.epoch = 0
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch sampler itself.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Called at each epoch start; every rank reshuffles the same way."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        for b in range(self.num_batches):
            pass_index, step = divmod(b, self.batches_per_pass)
            if step == 0:
                perm = np.random.default_rng([self.seed, self.epoch, pass_index]).permutation(self.size)
                if not self.drop_last and len(perm) % global_batch:  # complete the last global batch from the start
                    perm = np.concatenate([perm, perm[: global_batch - len(perm) % global_batch]])
            start = step * global_batch + lo
            yield [int(i) for i in perm[start : start + self.batch_size]]
