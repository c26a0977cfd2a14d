"""Zero-shot classification accuracy of a CLIP-style model, as a function and a torchmetrics ``Metric``.

:func:`zero_shot_accuracy` / :class:`ZeroShotAccuracy`: top-K accuracy of the zero-shot classifier
of CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021, Sec. 3.1.2): each class is the L2-normalised mean of its L2-normalised prompt embeddings
("A photo of a {c}." and the other templates, Sec. 3.1.4 "prompt ensembling"; :func:`zero_shot_classifier`),
and an image is assigned the classes of highest cosine similarity, searched on the shared faiss
helper (:func:`~contracts.index.search`). Image<->text retrieval, the other CLIP evaluation, is
:mod:`~lightning_modules.metrics.image_text`.

Under DDP, :class:`ZeroShotAccuracy` needs no embedding at all after ``update``: it stores the rank
of the true class of each image and lets torchmetrics concatenate those (padding duplicates dropped
by dataset index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from contracts.index import DEFAULT_CHUNK, ArrayLike, as_float32, search
from lightning_modules.metrics.embedding_store import cat_long_state, first_per_key
from lightning_modules.metrics.inputs import as_embeddings, as_index, as_tensor, check_batch, check_batch_index, check_chunk, check_ks, describe

ZERO_SHOT_KS = (1, 5)


def zero_shot_classifier(class_emb: ArrayLike) -> Tensor:
    """CLIP's zero-shot classifier weights ``[C, D]`` float32 from class prompt embeddings.

    ``class_emb`` is ``[C, D]`` (one prompt per class) or ``[C, P, D]`` (P prompts per class, the
    prompt ensemble of Radford et al. 2021, Sec. 3.1.4): each prompt embedding is L2-normalised,
    the P of a class averaged and the mean L2-normalised again (in float64).
    """
    t = as_tensor(class_emb, "class_emb")
    if t.dim() not in (2, 3) or not t.is_floating_point() or 0 in t.shape:
        raise ValueError(f"class_emb must be a non-empty float array [C, D] or [C, P, D] (P prompts per class), got {describe(t)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("class_emb has NaN or Inf values")
    w = F.normalize(t.double(), dim=-1)
    if w.dim() == 3:
        w = F.normalize(w.mean(dim=1), dim=-1)
    return w.float()


def zero_shot_accuracy(
    image_emb: ArrayLike,
    class_emb: ArrayLike,
    labels: ArrayLike,
    ks: Sequence[int] = ZERO_SHOT_KS,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """Top-K accuracy of CLIP's zero-shot classifier (cosine similarity, prompt ensembles averaged).

    Args:
        image_emb: ``[N, D]`` image embeddings.
        class_emb: ``[C, D]`` or ``[C, P, D]`` class prompt embeddings (see :func:`zero_shot_classifier`).
        labels: ``[N]`` integer class of each image, in ``0 .. C - 1``.
        ks: the K of top-K accuracy; a K of at least C counts every image as correct.

    Returns:
        Python floats ``acc@K`` for every K.
    """
    ks = check_ks(ks)
    check_chunk(chunk_size)
    images = as_embeddings(image_emb, "image_emb")
    classifier = zero_shot_classifier(class_emb)
    labels_t = as_index(labels, "labels", len(images), "image_emb")
    ranks = _true_class_rank(images, classifier, labels_t, max(ks), chunk_size, "zero_shot_accuracy")
    return {f"acc@{k}": float((ranks < k).double().mean()) for k in ks}


class ZeroShotAccuracy(Metric):
    """:func:`zero_shot_accuracy` accumulated over batches and synced across DDP ranks.

    Usage: ``metric.set_classifier(class_emb)`` once (``[C, D]`` or ``[C, P, D]``; kept across
    ``reset()``), then ``metric.update(emb, labels, index=None)`` per batch and ``metric.compute()``.
    Every rank must set the same classifier. ``update`` ranks the classes for the batch at once and
    keeps only the rank of the true class (one integer per image), so nothing large is stored or
    synced. Pass ``index`` (dataset indices ``[B]``) in every update to drop the rows
    ``DistributedSampler`` repeats to pad the last shard (first gathered row per index kept).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = ZERO_SHOT_KS, chunk_size: int = DEFAULT_CHUNK, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = check_ks(ks)
        check_chunk(chunk_size)
        self.chunk_size = chunk_size
        self.classifier: Tensor | None = None
        self.add_state("rank", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def set_classifier(self, class_emb: ArrayLike) -> None:
        """Set the class embeddings ``[C, D]`` or ``[C, P, D]`` (normalised, prompts averaged)."""
        self.classifier = zero_shot_classifier(class_emb)

    def update(self, emb: Tensor, labels: Tensor, index: Tensor | None = None) -> None:
        """Add a batch: ``emb: [B, D]``, ``labels: [B]`` classes, optional ``index: [B]`` dataset indices."""
        owner = type(self).__name__
        if self.classifier is None:
            raise ValueError(f"{owner}.update: call set_classifier(class_emb) before update")
        emb = check_batch(emb, owner, "emb")
        labels_t = check_batch_index(labels, len(emb), owner, "labels", "emb")
        if self.rank and (index is None) != (len(self.index) == 0):
            raise ValueError(f"{owner}.update: pass index in every update or in none")
        ranks = _true_class_rank(emb, self.classifier, labels_t.cpu(), max(self.ks), self.chunk_size, f"{owner}.update")
        self.rank.append(ranks.to(emb.device))
        if index is not None:
            self.index.append(check_batch_index(index, len(emb), owner, "index", "emb").to(emb.device))

    def compute(self) -> dict[str, float]:
        ranks = cat_long_state(self.rank, self.device).cpu()
        index = cat_long_state(self.index, self.device).cpu()
        if len(ranks) == 0:
            raise ValueError(f"{type(self).__name__}.compute() called before any update()")
        if len(index):
            if len(index) != len(ranks):
                raise ValueError(f"{type(self).__name__}: some ranks passed index and some did not; pass it everywhere")
            ranks = ranks[first_per_key(index.long())]
        return {f"acc@{k}": float((ranks < k).double().mean()) for k in self.ks}


def _true_class_rank(images: Tensor, classifier: Tensor, labels: Tensor, k_max: int, chunk_size: int, where: str) -> Tensor:
    """``[N]`` long: 0-based rank of each image's true class among the classes by cosine (``k_max`` when
    it is not among the first ``min(k_max, C)``)."""
    n_classes = len(classifier)
    if images.shape[1] != classifier.shape[1]:
        raise ValueError(f"{where}: image embeddings have dimension {images.shape[1]} but class_emb has {classifier.shape[1]}")
    if len(labels) and (int(labels.max()) >= n_classes):
        raise ValueError(f"{where}: label {int(labels.max())} is not a class of class_emb (C = {n_classes}); expected 0 .. {n_classes - 1}")
    k = min(k_max, n_classes)
    _, ids = search(as_float32(images, normalize=True), classifier.numpy(), k, metric="ip", chunk=chunk_size)
    hit = ids == labels.numpy()[:, None]
    return torch.from_numpy(np.where(hit.any(axis=1), hit.argmax(axis=1), k_max)).long()
