"""Image<->text retrieval Recall@K of a CLIP-style model, as a function and a torchmetrics ``Metric``.

:func:`image_text_retrieval` (embeddings in memory) and :class:`ImageTextRetrievalMetrics`
(DDP-synced, padding duplicates dropped by dataset index) implement the zero-shot retrieval protocol
of CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021; zero-shot retrieval on MS-COCO / Flickr30k), as clip_benchmark computes it. Each image has
one or more captions (COCO: 5). ``t2i_r@K`` (text -> image): the fraction of captions whose image is
among the K images nearest to the caption. ``i2t_r@K`` (image -> text): the fraction of images for
which *any* of their captions is among the K texts nearest to the image (equivalently, the
best-ranked own caption has rank <= K). Zero-shot classification accuracy, the other CLIP
evaluation, is :mod:`~lightning_modules.metrics.zero_shot`.

Similarity is the cosine: every embedding is L2-normalised inside, chunk by chunk, on the shared
faiss helper (:mod:`~contracts.index`, through
:func:`~lightning_modules.metrics.sharded.iter_sharded_search`), so no ``[I, T]`` similarity matrix
is ever held: memory is the index plus ``O(chunk_size * (D + K))``. Ties between references are
broken by the lower reference id (faiss' order), i.e. by dataset index in the Metric class.

Under DDP, :class:`ImageTextRetrievalMetrics` keeps each rank's image and text embeddings on that
rank (the shards of a sharded search, as :class:`~lightning_modules.metrics.RetrievalMetrics`);
only dataset indices (a few bytes per row) are all-gathered, and the hit counts are summed across
ranks.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from contracts.index import DEFAULT_CHUNK, ArrayLike, IndexKind
from lightning_modules.metrics.embedding_store import cat_long_state, first_per_key
from lightning_modules.metrics.inputs import as_embeddings, as_index, check_batch, check_batch_index, check_chunk, check_ks
from lightning_modules.metrics.sharded import comm_device, distributed_world, iter_sharded_search

RETRIEVAL_KS = (1, 5, 10)


def image_text_retrieval(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Sequence[int] = RETRIEVAL_KS,
    chunk_size: int = DEFAULT_CHUNK,
    index: IndexKind = "flat",
    **index_kwargs: Any,
) -> dict[str, float]:
    """Image->text and text->image Recall@K (cosine) of paired image and caption embeddings.

    Args:
        image_emb: ``[I, D]`` image embeddings (any float dtype; searched in float32).
        text_emb: ``[T, D]`` caption embeddings.
        text_to_image: ``[T]`` integer: the row of ``image_emb`` each caption describes. Every
            image must have at least one caption (its image->text recall is otherwise undefined).
        ks: the K of Recall@K. A K at least the number of references counts every query as found.
        chunk_size: queries searched at once.
        index: ``"flat"`` (exact) or an approximate index (``index_kwargs`` as in
            :func:`~contracts.index.build_index`).

    Returns:
        Python floats ``i2t_r@K`` (an image is found when *any* of its captions is among its K
        nearest texts) and ``t2i_r@K`` (a caption is found when its image is among its K nearest
        images), for every K.
    """
    ks = check_ks(ks)
    check_chunk(chunk_size)
    images = as_embeddings(image_emb, "image_emb")
    texts = as_embeddings(text_emb, "text_emb")
    if texts.shape[1] != images.shape[1]:
        raise ValueError(f"text_emb has dimension {texts.shape[1]} but image_emb has {images.shape[1]}; expected the same")
    targets = as_index(text_to_image, "text_to_image", len(texts), "text_emb").numpy()
    n_images, n_texts = len(images), len(texts)
    if targets.max() >= n_images:
        bad = np.flatnonzero(targets >= n_images)
        raise ValueError(
            f"text_to_image[{bad[0]}] = {targets[bad[0]]} but image_emb has {n_images} rows; expected row numbers 0 .. {n_images - 1}"
        )
    _check_every_image_captioned(np.arange(n_images), targets, "image_emb rows")
    image_ids = np.arange(n_images, dtype=np.int64)
    t2i = _first_hit_counts(texts, targets, images, image_ids, (image_ids, image_ids), ks, n_images,
                            chunk_size, index, None, False, **index_kwargs)
    i2t = _first_hit_counts(images, image_ids, texts, np.arange(n_texts, dtype=np.int64), (np.arange(n_texts), targets),
                            ks, n_texts, chunk_size, index, None, False, **index_kwargs)
    return _retrieval_dict(ks, i2t, n_images, t2i, n_texts)


class ImageTextRetrievalMetrics(Metric):
    """:func:`image_text_retrieval` accumulated over batches and synced across DDP ranks.

    Usage, per validation batch (images and captions may come in the same batch or from two
    dataloaders)::

        metric.update_images(image_emb, index)                  # [B, D], [B] dataset image indices
        metric.update_texts(text_emb, index, image_index)       # [B', D], [B'] caption indices, [B'] image index of each
        metric.compute()                                        # {"i2t_r@1": ..., "t2i_r@1": ...}

    ``index`` is required: captions name their image by its dataset index, and the indices drop
    the rows that ``DistributedSampler(drop_last=False)`` repeats to pad the last shard (the first
    row gathered per index is kept; images and captions are separate index spaces). The result
    equals :func:`image_text_retrieval` of one process on the images and captions in index order.

    ``sharded=True`` (default): each rank's embeddings stay on it as its shard of the sharded
    search; ``compute()`` is collective. ``sharded=False`` lets torchmetrics gather every
    embedding to every rank, which then computes alone.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        ks: Sequence[int] = RETRIEVAL_KS,
        chunk_size: int = DEFAULT_CHUNK,
        index: IndexKind = "flat",
        sharded: bool = True,
        **kwargs: Any,
    ) -> None:
        if sharded and kwargs.get("sync_on_compute", False):
            raise ValueError("sync_on_compute=True gathers every embedding to every rank; it needs sharded=False")
        if sharded:
            kwargs["sync_on_compute"] = False
        super().__init__(**kwargs)
        self.ks = check_ks(ks)
        check_chunk(chunk_size)
        self.chunk_size = chunk_size
        self.index_kind = index
        self.sharded = sharded
        for name in ("image_emb", "image_index", "text_emb", "text_index", "text_image"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_emb: Tensor | None = None,
        image_index: Tensor | None = None,
        text_emb: Tensor | None = None,
        text_index: Tensor | None = None,
        text_to_image: Tensor | None = None,
    ) -> None:
        """Add images (``image_emb [B, D]``, ``image_index [B]``) and/or captions (``text_emb [B', D]``,
        ``text_index [B']``, ``text_to_image [B']``: the dataset index of each caption's image)."""
        owner = type(self).__name__
        if image_emb is None and text_emb is None:
            raise ValueError(f"{owner}.update: pass image_emb (with image_index) or text_emb (with text_index and text_to_image)")
        add: list[tuple[list, Tensor]] = []  # checked first, stored after: a bad argument adds nothing
        if image_emb is not None:
            emb = check_batch(image_emb, owner, "image_emb")
            add += [(self.image_emb, emb),
                    (self.image_index, check_batch_index(image_index, len(emb), owner, "image_index", "image_emb").to(emb.device))]
        if text_emb is not None:
            emb = check_batch(text_emb, owner, "text_emb")
            add += [(self.text_emb, emb),
                    (self.text_index, check_batch_index(text_index, len(emb), owner, "text_index", "text_emb").to(emb.device)),
                    (self.text_image, check_batch_index(text_to_image, len(emb), owner, "text_to_image", "text_emb").to(emb.device))]
        for state, value in add:
            state.append(value)

    def update_images(self, emb: Tensor, index: Tensor) -> None:
        """Add a batch of images: ``emb: [B, D]``, ``index: [B]`` dataset image indices."""
        self.update(image_emb=emb, image_index=index)

    def update_texts(self, emb: Tensor, index: Tensor, image_index: Tensor) -> None:
        """Add a batch of captions: ``emb: [B, D]``, ``index: [B]`` caption indices, ``image_index: [B]``."""
        self.update(text_emb=emb, text_index=index, text_to_image=image_index)

    def compute(self) -> dict[str, float]:
        owner = type(self).__name__
        world = distributed_world(self.process_group) if self.sharded else 1
        img_emb, img_idx = _local_emb(self.image_emb, self.device), cat_long_state(self.image_index, self.device)
        txt_emb, txt_idx, txt_img = _local_emb(self.text_emb, self.device), cat_long_state(self.text_index, self.device), cat_long_state(self.text_image, self.device)
        img_all, img_mine = _gather(img_idx, world, self.process_group)
        txt_all, txt_mine = _gather(txt_idx, world, self.process_group)
        txt_img_all, _ = _gather(txt_img, world, self.process_group)
        if len(img_all) == 0 or len(txt_all) == 0:
            raise ValueError(f"{owner}.compute() needs images and captions; got {len(img_all)} image rows and {len(txt_all)} caption rows")
        img_order, txt_order = first_per_key(img_all), first_per_key(txt_all)
        image_ids = img_all[img_order].numpy()  # sorted, distinct
        text_ids, text_targets = txt_all[txt_order].numpy(), txt_img_all[txt_order].numpy()
        # A partial pass (Lightning's sanity check, limit_val_batches, fast_dev_run) can see captions of images it did
        # not embed, and images none of whose captions it saw: score the consistent part and say so.
        missing = ~np.isin(text_targets, image_ids)
        if missing.any():
            warnings.warn(f"{owner}: {int(missing.sum())} captions name images that were never added (caption index {text_ids[missing][0]} -> "
                          f"image index {text_targets[missing][0]}); they are left out (a partial evaluation pass?)", stacklevel=2)
            text_ids, text_targets = text_ids[~missing], text_targets[~missing]
        lonely = ~np.isin(image_ids, text_targets)
        if lonely.any():
            warnings.warn(f"{owner}: {int(lonely.sum())} images have no caption among those added (image indices {image_ids[lonely][:10].tolist()}); "
                          f"they are left out (a partial evaluation pass?)", stacklevel=2)
            image_ids = image_ids[~lonely]
        if len(image_ids) == 0:
            raise ValueError(f"{owner}.compute(): no image has a caption among those added")
        keep_img = _kept(img_order, len(img_all))[img_mine] & torch.from_numpy(np.isin(img_idx.cpu().numpy(), image_ids))
        keep_txt = _kept(txt_order, len(txt_all))[txt_mine] & torch.from_numpy(np.isin(txt_idx.cpu().numpy(), text_ids))
        img_emb, img_idx = img_emb[keep_img], img_idx.cpu()[keep_img]
        txt_emb, txt_idx, txt_img = txt_emb[keep_txt], txt_idx.cpu()[keep_txt], txt_img.cpu()[keep_txt]
        distributed = world > 1
        t2i = _first_hit_counts(txt_emb, txt_img.numpy(), img_emb, img_idx.numpy(), (image_ids, image_ids), self.ks,
                                len(image_ids), self.chunk_size, self.index_kind, self.process_group, distributed)
        i2t = _first_hit_counts(img_emb, img_idx.numpy(), txt_emb, txt_idx.numpy(), (text_ids, text_targets), self.ks,
                                len(text_ids), self.chunk_size, self.index_kind, self.process_group, distributed)
        if distributed:
            both = torch.from_numpy(np.concatenate([i2t, t2i])).to(comm_device(self.process_group))
            dist.all_reduce(both, group=self.process_group)
            i2t, t2i = np.split(both.cpu().numpy(), 2)
        return _retrieval_dict(self.ks, i2t, len(image_ids), t2i, len(text_ids))


def _first_hit_counts(
    queries: ArrayLike,
    query_targets: np.ndarray,
    reference: ArrayLike,
    reference_ids: np.ndarray,
    id_targets: tuple[np.ndarray, np.ndarray],
    ks: tuple[int, ...],
    n_reference: int,
    chunk_size: int,
    index: IndexKind,
    group: Any,
    distributed: bool,
    **index_kwargs: Any,
) -> np.ndarray:
    """``[len(ks)]`` int64: how many of this rank's queries have a reference of their own target
    among their K nearest (cosine), for each K.

    ``id_targets = (ids, targets)`` maps every global reference id (``ids`` sorted ascending) to the
    target it matches: the image itself for text->image, the caption's image for image->text.
    Collective when ``distributed``.
    """
    k = min(max(ks), n_reference)
    sorted_ids, targets = np.asarray(id_targets[0], dtype=np.int64), np.asarray(id_targets[1], dtype=np.int64)
    counts = np.zeros(len(ks), dtype=np.int64)
    for start, _, ids in iter_sharded_search(queries, reference, k, reference_ids, "ip", index, chunk_size, group,
                                             distributed, normalize=True, **index_kwargs):
        slot = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        hit_targets = np.where((ids >= 0) & (sorted_ids[slot] == ids), targets[slot], -1)
        hit = hit_targets == query_targets[start : start + len(ids), None]
        first = np.where(hit.any(axis=1), hit.argmax(axis=1), k)  # 0-based rank of the first match
        counts += np.array([(first < kk).sum() for kk in ks], dtype=np.int64)
    return counts


def _retrieval_dict(ks: tuple[int, ...], i2t: np.ndarray, n_images: int, t2i: np.ndarray, n_texts: int) -> dict[str, float]:
    out = {f"i2t_r@{k}": float(c) / n_images for k, c in zip(ks, i2t)}
    out.update({f"t2i_r@{k}": float(c) / n_texts for k, c in zip(ks, t2i)})
    return out


def _check_every_image_captioned(image_ids: np.ndarray, targets: np.ndarray, what: str) -> None:
    lonely = ~np.isin(image_ids, targets)
    if lonely.any():
        shown = image_ids[lonely][:10].tolist()
        raise ValueError(
            f"{int(lonely.sum())} images have no caption ({what} {shown}{' ...' if lonely.sum() > 10 else ''}); "
            "image->text recall needs at least one caption per image"
        )


def _local_emb(state: list[Tensor] | Tensor, device: torch.device) -> Tensor:
    if isinstance(state, list):
        return dim_zero_cat(state).detach().cpu() if state else torch.empty(0, 0)
    return state.detach().cpu()


def _gather(local: Tensor, world: int, group: Any) -> tuple[Tensor, slice]:
    """Every rank's ``local [n_r]`` concatenated in rank order (CPU) and this rank's slice of it."""
    if world == 1:
        return local.cpu(), slice(0, len(local))
    parts = gather_all_tensors(local, group)
    rank = dist.get_rank(group)
    start = sum(len(p) for p in parts[:rank])
    return torch.cat(parts).cpu(), slice(start, start + len(local))


def _kept(order: Tensor, n: int) -> Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order] = True
    return keep
