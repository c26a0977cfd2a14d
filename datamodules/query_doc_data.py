"""What a query/document benchmark loads (``QueryDocData``, ``QueryDocSplit``) and the views its loaders serve it through.

``QueryDocDataModule.load_query_doc()`` (``datamodules.query_doc``) returns a ``QueryDocData``: a
corpus of documents (lazy is fine: ``__len__`` and ``__getitem__(int) -> str``), query splits whose
relevance is a list of corpus rows per query (qrels; a document may be relevant to several queries
and a query may have several relevant documents), optional official ids, and optionally a list of
candidate hard negatives per train query, best first (BM25 or a mined ANN list; WordNet's sibling
synsets).

``RowView`` selects rows of a (possibly lazy) sequence without copying it (the queries kept after
those without qrels are dropped). ``TextsDataset`` serves the evaluation queries or the corpus as
``{"text"}`` items, and ``LengthSortedSampler`` orders them longest first so that a batch pads
little; ``text_lengths`` gives the lengths without reading a lazy collection's texts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler


@dataclass
class QueryDocSplit:
    """One query split: query texts by row, the relevant corpus rows of every query, optional official ids.

    ``queries`` may be lazy (``__len__`` and ``__getitem__(int) -> str``). ``num_dropped``: queries
    the loader dropped for having no relevant document (reported by ``hardneg data check``).
    """

    queries: Sequence[str]
    qrels: list[list[int]]
    query_ids: Sequence[str] | None = None
    num_dropped: int = 0


@dataclass
class QueryDocData:
    """What ``QueryDocDataModule.load_query_doc`` returns: the corpus (lazy is fine), the splits, optional
    official document ids and optional static hard-negative candidates per train query (best first)."""

    corpus: Sequence[str]
    train: QueryDocSplit
    val: QueryDocSplit | None = None
    test: QueryDocSplit | None = None
    doc_ids: Sequence[str] | None = None
    negatives: Sequence[Sequence[int]] | None = None


class RowView(Sequence):
    """The rows ``rows`` of a (possibly lazy) sequence, without copying it."""

    def __init__(self, data: Sequence, rows: Sequence[int]) -> None:
        self.data, self.rows = data, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.data[int(self.rows[index])]


class TextsDataset(Dataset):
    """Texts by row as ``{"text": str}`` items (the evaluation queries or the corpus; ``Indexed`` adds the row)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index]}

    def lengths(self) -> np.ndarray:
        """Each text's length, without reading the texts of a lazy collection (its line sizes)."""
        return text_lengths(self.texts)


def text_lengths(texts: Sequence[str]) -> np.ndarray:
    """Length (characters, or bytes of a lazily read file's lines) of every text of ``texts``."""
    offsets = getattr(texts, "offsets", None)
    if offsets is not None:
        return np.diff(np.asarray(offsets, dtype=np.int64))
    if isinstance(texts, RowView):
        return text_lengths(texts.data)[texts.rows]
    return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))


class LengthSortedSampler(Sampler[int]):
    """The rows of an evaluation set longest first, this rank's share of them (``rank::world_size``,
    padded with the first rows to equal counts, as ``DistributedSampler``; the metric drops the
    repeats by their ``index``). A batch of similar lengths pads little: the corpus of the WordNet
    benchmark (2 to 60 characters) encodes about twice as fast as in file order."""

    def __init__(self, lengths: np.ndarray, rank: int = 0, world_size: int = 1) -> None:
        order = np.argsort(-np.asarray(lengths), kind="stable")
        per_rank = -(-len(order) // world_size) if len(order) else 0
        padded = np.concatenate([order, order[: per_rank * world_size - len(order)]]) if world_size > 1 else order
        self.rows = padded[rank::world_size] if world_size > 1 else padded

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        return iter(int(r) for r in self.rows)
