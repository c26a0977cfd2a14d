"""Integer id lists per key, stored flat: ``IdLists`` (a mapping key -> ids) and ``RaggedRows`` (ids per row).

The MS MARCO hard-negative files (``datamodules.msmarco_files``) list hundreds of millions of pids,
which as Python ints in a dict of lists would take tens of GB. Per-query id lists are held instead
as keys, offsets and one flat int64 array, with vectorised lookups (``lookup``, ``select``) that
take a whole array of query ids at once. ``RaggedRows`` is the same indexed by position, a lazy
stand-in for ``list[list[int]]`` (the candidate corpus rows of every train query).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np


class IdLists(Mapping):
    """Per key (a query id, or a query row), a list of integer ids, stored flat: ``keys`` ascending,
    ``values[offsets[i]:offsets[i + 1]]`` the list of ``keys[i]``, in the order the file gave them.

    A read-only mapping ``key -> np.ndarray[int64]``; ``lengths()`` gives every list's size at once.
    """

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> None:
        self.keys_array = np.asarray(keys, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int64)
        if len(self.offsets) != len(self.keys_array) + 1:
            raise ValueError(f"IdLists: {len(self.offsets)} offsets for {len(self.keys_array)} keys; expected keys + 1")

    @classmethod
    def from_segments(cls, keys: Iterable[int] | np.ndarray, lengths: Iterable[int] | np.ndarray, values: Iterable[int] | np.ndarray) -> IdLists:
        """Lists given one after another: ``keys[i]`` owns the next ``lengths[i]`` values. A key given
        twice gets its lists joined (in file order, without repeats)."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        if len(keys) != len(lengths) or int(lengths.sum()) != len(values):
            raise ValueError(f"IdLists.from_segments: {len(keys)} keys, {len(lengths)} lengths summing to {int(lengths.sum())}, {len(values)} values")
        order = np.argsort(keys, kind="stable")
        if len(keys) > 1 and bool(np.any(keys[order][1:] == keys[order][:-1])):
            return cls.from_pairs(np.repeat(keys, lengths), values)
        starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        new_lengths = lengths[order]
        offsets = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int64)
        # gather: element j of sorted segment i comes from starts[order[i]] + j
        gather = np.repeat(starts[order] - offsets[:-1], new_lengths) + np.arange(offsets[-1], dtype=np.int64)
        return cls(keys[order], offsets, values[gather])

    @classmethod
    def from_pairs(cls, keys: np.ndarray, values: np.ndarray, dedupe: bool = True) -> IdLists:
        """One ``(key, value)`` pair per element, in file order; ``dedupe`` keeps the first of repeated pairs."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        if dedupe and len(keys) > 1:
            by_pair = np.lexsort((np.arange(len(keys)), values, keys))
            repeat = (keys[by_pair][1:] == keys[by_pair][:-1]) & (values[by_pair][1:] == values[by_pair][:-1])
            keep = np.ones(len(keys), dtype=bool)
            keep[by_pair[1:][repeat]] = False
            keys, values = keys[keep], values[keep]
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        unique, counts = np.unique(keys, return_counts=True)
        return cls(unique, np.concatenate([[0], np.cumsum(counts)]), values)

    @classmethod
    def from_dict(cls, lists: Mapping[int, Iterable[int]]) -> IdLists:
        items = [(int(k), list(v)) for k, v in lists.items()]
        return cls.from_segments([k for k, _ in items], [len(v) for _, v in items], [x for _, v in items for x in v])

    def _position(self, key) -> int:
        key = int(key)
        i = int(np.searchsorted(self.keys_array, key))
        if i >= len(self.keys_array) or self.keys_array[i] != key:
            raise KeyError(key)
        return i

    def __getitem__(self, key) -> np.ndarray:
        i = self._position(key)
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __contains__(self, key) -> bool:
        try:
            self._position(key)
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        return len(self.keys_array)

    def __iter__(self) -> Iterator[int]:
        return (int(k) for k in self.keys_array)

    def lengths(self) -> np.ndarray:
        """The size of every list, in key order ``[len(self)]``."""
        return np.diff(self.offsets)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``keys`` among this mapping's keys (vectorised) and whether each is present."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(self.keys_array, keys)
        found = pos < len(self.keys_array)
        found[found] = self.keys_array[pos[found]] == keys[found]
        return pos, found

    def select(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lists of ``keys`` one after another (vectorised): ``(lengths [len(keys)], values)``; an
        absent key has an empty list."""
        pos, found = self.lookup(keys)
        safe = np.minimum(pos, max(len(self) - 1, 0))
        lengths = np.where(found, self.lengths()[safe], 0) if len(self) else np.zeros(len(pos), dtype=np.int64)
        starts = np.where(found, self.offsets[safe], 0) if len(self) else np.zeros(len(pos), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return lengths.astype(np.int64), self.values[gather]

    def __repr__(self) -> str:
        return f"IdLists({len(self)} keys, {len(self.values)} ids)"


class RaggedRows:
    """Per row ``i`` (a train query row), an int64 array (its candidate corpus rows): ``offsets``/``values``
    like ``IdLists`` but indexed by position; a lazy stand-in for ``list[list[int]]``."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray) -> None:
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range ({len(self)} rows)")
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __repr__(self) -> str:
        return f"RaggedRows({len(self)} rows, {len(self.values)} values)"
