"""Training pairs streamed from webdataset tar shards: ``ShardStream``, an ``IterableDataset`` that yields whole batches.

Every rank yields exactly ``num_batches`` batches per epoch, so DDP ranks never disagree on the
number of steps (``ImageTextDataModule`` gives it, or derives it from the sample total). The samples
are split across the (rank, dataloader worker) slots: with counted shards, every pass's sample
sequence is cut into one contiguous chunk per slot, at least as large as what the slot consumes, so
the slots of an epoch read disjoint samples; with a declared total, a slot reads whole shards
(``shards[slot::slots]``) when there are enough, else every ``slots``-th sample. A slot cycles pass
after pass, reshuffling the shard order every pass (from ``seed``, the epoch and the pass, identical
on every rank) and its samples through a shuffle buffer, until its batches are done. The epoch is
set by Lightning's ``set_epoch`` call on the loader's sampler (``stream_loader``) and held in shared
memory, so persistent workers see it.

A corrupt or incomplete sample (undecodable image, no image or caption member, a truncated shard)
is skipped and counted, never silently: a ``SkipCounter`` in shared memory sums the skips of every
dataloader worker, and each skip is logged at DEBUG level with its shard and key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from datamodules.image_text_items import _apply, _negative_fields, decode_image
from datamodules.webdataset_shards import RawSample, iter_tar_samples

log = logging.getLogger(__name__)

_MAX_WORKERS = 256


class SkipCounter:
    """Skipped-sample counts shared with dataloader workers: one shared-memory slot per worker
    (each slot written by one process only), summed on read."""

    def __init__(self) -> None:
        self.counts = torch.zeros(_MAX_WORKERS + 1, dtype=torch.long).share_memory_()

    def add(self, n: int = 1) -> None:
        info = get_worker_info()
        self.counts[0 if info is None else 1 + info.id % _MAX_WORKERS] += n

    def total(self) -> int:
        return int(self.counts.sum())


class ShardStream(IterableDataset):
    """Training pairs streamed from tar shards as whole batches (lists of items); see the module docstring.

    Each item is ``{"image", "text", "index"}`` (+ ``neg_text``, ``neg_image``, ``has_neg`` when
    ``with_neg_text``/``with_neg_image``); ``index`` is ``shard << 24 | position in shard``.
    ``len()`` is ``num_batches``, this rank's batches per epoch, split over the dataloader workers.

    Args:
        shards: the shard files (every rank the same list, in the same order).
        batch_size: items per batch (per rank).
        num_batches: batches per epoch on this rank (the same on every rank).
        rank, world_size: this process's place in DDP.
        seed: shard order and shuffling are functions of (seed, epoch, pass, slot).
        shuffle_buffer: samples held for shuffling per slot (1: read order).
        with_neg_text, with_neg_image: emit the negative fields.
        transform: per-image transform (set by the input pipeline).
        skipped: the shared counter of skipped samples.
        shard_sizes: samples per shard (all, complete or not; ``scan_shards``), for balanced disjoint slots.
    """

    labels = np.zeros(0, dtype=np.int64)  # no per-item labels without reading the shards

    def __init__(
        self,
        shards: Sequence[str],
        batch_size: int,
        num_batches: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        with_neg_text: bool = False,
        with_neg_image: bool = False,
        transform: Callable | None = None,
        skipped: SkipCounter | None = None,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"ShardStream needs batch_size >= 1 and num_batches >= 1, got {batch_size}, {num_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards, self.batch_size, self.num_batches = list(shards), batch_size, num_batches
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, max(1, shuffle_buffer)
        self.with_neg_text, self.with_neg_image = with_neg_text, with_neg_image
        self.transform = transform
        if shard_sizes is not None and len(shard_sizes) != len(self.shards):
            raise ValueError(f"ShardStream: {len(shard_sizes)} shard sizes for {len(self.shards)} shards")
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else None
        self.skipped = skipped if skipped is not None else SkipCounter()
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        return self.iter_slot(0 if info is None else info.id, 1 if info is None else info.num_workers)

    def batches_of(self, worker: int, num_workers: int) -> int:
        """Batches per epoch of dataloader worker ``worker`` (the rank's ``num_batches`` split over its workers)."""
        return self.num_batches // num_workers + (worker < self.num_batches % num_workers)

    def iter_slot(self, worker: int, num_workers: int) -> Iterator[list[dict[str, Any]]]:
        """The batches of dataloader worker ``worker`` of ``num_workers`` on this rank (``__iter__``
        calls it with the worker info; tests call it directly to simulate workers)."""
        n_batches = self.batches_of(worker, num_workers)
        if n_batches == 0:
            return
        epoch = int(self._epoch[0])
        rng = np.random.default_rng([self.seed, epoch, self.rank * num_workers + worker, 1])
        buffer: list[RawSample] = []
        batch: list[dict[str, Any]] = []
        done, in_pass, good_in_pass = 0, 0, 0
        for raw in self._raw_stream(epoch, worker, num_workers):
            if raw is not None:
                in_pass += 1
                buffer.append(raw)
                if len(buffer) < self.shuffle_buffer:
                    continue
            # a full buffer releases one random sample; the end of a pass (None) drains it, so a pass is read whole before the next
            while buffer:
                k = int(rng.integers(len(buffer)))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                item = self.decode(buffer.pop(), rng)
                if item is not None:
                    good_in_pass += 1
                    batch.append(item)
                    if len(batch) == self.batch_size:
                        yield batch
                        batch, done = [], done + 1
                        if done == n_batches:
                            return
                if raw is not None:
                    break
            if raw is None:
                if good_in_pass == 0:
                    raise RuntimeError(f"ShardStream: rank {self.rank} worker {worker} found no usable sample in a whole pass over its part "
                                       f"of the shards ({in_pass} read, {self.skipped.total()} skipped so far); shards: {self.shards[:3]}")
                in_pass = good_in_pass = 0

    def _raw_stream(self, epoch: int, worker: int, num_workers: int) -> Iterator[RawSample | None]:
        """This (rank, worker) slot's samples, pass after pass (``None`` marks the end of a pass).

        Every pass orders the shards by a permutation of (seed, epoch, pass), the same on every rank.
        With the shard sizes known, the pass's sample sequence is cut into contiguous chunks, one per
        slot, sized in proportion to the slot's batches (each chunk holds at least what its slot
        consumes, so the slots of one epoch read disjoint samples); without, a slot reads whole
        shards (``shards[slot::slots]``) when there are enough, else every ``slots``-th sample.
        """
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        demand = [self.batches_of(w, num_workers) for _ in range(self.world_size) for w in range(num_workers)]
        p = 0
        while True:
            order = np.random.default_rng([self.seed, epoch, p, 0]).permutation(len(self.shards))
            if self.shard_sizes is not None:
                sizes = np.asarray(self.shard_sizes)[order]
                total, before = int(sizes.sum()), sum(demand[:slot])
                lo, hi = total * before // sum(demand), total * (before + demand[slot]) // sum(demand)
                start = 0
                for s, size in zip(order, sizes):
                    if start < hi and start + size > lo:
                        for raw in iter_tar_samples(self.shards[s], int(s)):
                            if start + raw.position >= hi:
                                break
                            if start + raw.position >= lo:
                                yield raw
                    start += int(size)
            elif len(self.shards) >= slots:
                for s in order[slot::slots]:
                    yield from iter_tar_samples(self.shards[s], int(s))
            else:
                counter = 0
                for s in order:
                    for raw in iter_tar_samples(self.shards[s], int(s)):
                        if counter % slots == slot:
                            yield raw
                        counter += 1
            yield None
            p += 1

    def decode(self, raw: RawSample, rng: np.random.Generator) -> dict[str, Any] | None:
        """The item of ``raw``, or ``None`` (counted in ``skipped``) when it is incomplete or does not decode."""
        problem = raw.problem()
        if problem is None:
            try:
                image = decode_image(raw.image_bytes())
                captions = raw.lines("txt")
                j = int(rng.integers(len(captions)))
                item = {"image": _apply(self.transform, image), "text": captions[j], "index": raw.index}
                negs = raw.lines("neg_caption")
                neg_text = negs[j] if j < len(negs) else (negs[0] if negs else None)
                neg_bytes = raw.neg_image_bytes() if self.with_neg_image and neg_text is not None else None
                neg_image = decode_image(neg_bytes) if neg_bytes is not None else None
                _negative_fields(item, neg_text, neg_image, self.transform, self.with_neg_text, self.with_neg_image)
                return item
            except Exception as err:  # PIL raises several types for truncated/corrupt files
                problem = f"undecodable image: {err}"
        self.skipped.add()
        log.debug("skipped sample %r of shard %s: %s", raw.key, self.shards[raw.shard] if raw.shard < len(self.shards) else "?", problem)
        return None


class _EpochSignal(Sampler):
    """The sampler of a ``ShardStream`` loader: infinite (the stream decides when an epoch ends) and
    forwarding Lightning's ``set_epoch`` call to the stream."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


def stream_loader(stream: ShardStream, collate_fn: Callable | None, **kwargs) -> DataLoader:
    """A ``DataLoader`` over a ``ShardStream`` (it yields whole batches) whose sampler receives ``set_epoch``."""
    loader = DataLoader(stream, batch_size=None, collate_fn=collate_fn, **kwargs)
    # DataLoader refuses a sampler for an IterableDataset; the signal replaces its constant one after init.
    object.__setattr__(loader, "sampler", _EpochSignal(stream))
    return loader
