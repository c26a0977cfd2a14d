"""Pairwise compositional accuracy: SugarCrepe and SugarCrepe++ scores from embeddings.

A compositionality benchmark pairs each image with a caption and a hard negative caption that
differs only in composition (an attribute swapped, an object replaced ...). A model is right on a
sample when it scores the true caption strictly above the negative. Every score here is the cosine
similarity: embeddings are L2-normalised inside (in float64), and a tie counts as wrong, as in the
benchmarks' own evaluation code (``pos_score > neg_score``).

- :func:`sugarcrepe_accuracy`: Hsieh, Zhang, Ma, Kembhavi, Krishna, "SugarCrepe: Fixing Hackable
  Benchmarks for Vision-Language Compositionality", NeurIPS 2023 Datasets and Benchmarks
  (image-to-text retrieval between the positive and the negative caption). Correct when
  ``cos(I, P) > cos(I, N)``.
- :func:`sugarcrepe_pp_scores`: Dumpala, Jaiswal, Sastry, Milios, Oore, Sajjad, "SUGARCREPE++
  Dataset: Vision-Language Model Sensitivity to Semantic and Lexical Alterations", NeurIPS 2024
  Datasets and Benchmarks. Two positive captions ``P1``, ``P2`` (same
  meaning, different wording) and one negative ``N``. Their evaluation code (``VLMs/test_*.py``,
  ``evaluate_ulms.py`` of the authors' repository) compares cosine similarities of unit
  embeddings, all strictly:

  - ITT (image-to-text task): ``cos(I, P1) > cos(I, N)`` and ``cos(I, P2) > cos(I, N)``;
  - TOT (text-only task, the image ignored): ``cos(P1, P2) > cos(P1, N)`` and ``cos(P1, P2) > cos(P2, N)``.

- :func:`negative_image_accuracy`: the text-to-image direction (a caption with its image and a
  hard negative image, as in the image-side tests of compositionality benchmarks): correct when
  ``cos(T, I) > cos(T, I_neg)``.

The per-sample building block :func:`pairwise_correct` returns a boolean per row, so a caller can
split the accuracy by category (SugarCrepe reports its seven categories separately).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.metrics.inputs import ArrayLike, as_embeddings


def pairwise_correct(anchor: ArrayLike, positive: ArrayLike, negative: ArrayLike, names: tuple[str, str, str] = ("anchor", "positive", "negative")) -> Tensor:
    """``[N]`` bool: ``cos(anchor_i, positive_i) > cos(anchor_i, negative_i)`` (strict; a tie is False)."""
    a, p, n = _unit_rows((anchor, positive, negative), names)
    return _cos(a, p) > _cos(a, n)


def sugarcrepe_accuracy(image_emb: ArrayLike, caption_emb: ArrayLike, negative_caption_emb: ArrayLike) -> float:
    """SugarCrepe accuracy: the fraction of samples whose caption scores strictly above its negative.

    Args:
        image_emb: ``[N, D]`` image embeddings (row i is sample i's image; repeat rows for images
            shared by several samples).
        caption_emb: ``[N, D]`` positive caption embeddings.
        negative_caption_emb: ``[N, D]`` hard negative caption embeddings.
    """
    return _mean(pairwise_correct(image_emb, caption_emb, negative_caption_emb, ("image_emb", "caption_emb", "negative_caption_emb")))


def sugarcrepe_pp_scores(image_emb: ArrayLike, caption_emb: ArrayLike, caption2_emb: ArrayLike, negative_caption_emb: ArrayLike) -> dict[str, float]:
    """SugarCrepe++ ITT and TOT accuracy (see the module docstring for the comparisons).

    Args:
        image_emb: ``[N, D]`` image embeddings.
        caption_emb: ``[N, D]`` first positive caption (``caption``).
        caption2_emb: ``[N, D]`` second positive caption (``caption2``).
        negative_caption_emb: ``[N, D]`` negative caption.

    Returns:
        ``{"itt": float, "tot": float}``.
    """
    img, p1, p2, neg = _unit_rows(
        (image_emb, caption_emb, caption2_emb, negative_caption_emb),
        ("image_emb", "caption_emb", "caption2_emb", "negative_caption_emb"),
    )
    image_neg = _cos(img, neg)
    itt = (_cos(img, p1) > image_neg) & (_cos(img, p2) > image_neg)
    p1_p2 = _cos(p1, p2)
    tot = (p1_p2 > _cos(p1, neg)) & (p1_p2 > _cos(p2, neg))
    return {"itt": _mean(itt), "tot": _mean(tot)}


def negative_image_accuracy(text_emb: ArrayLike, image_emb: ArrayLike, neg_image_emb: ArrayLike) -> float:
    """Text-to-image accuracy: the fraction of captions scoring their image strictly above the negative image.

    Args:
        text_emb: ``[N, D]`` caption embeddings.
        image_emb: ``[N, D]`` the image each caption describes.
        neg_image_emb: ``[N, D]`` a hard negative image per caption.
    """
    return _mean(pairwise_correct(text_emb, image_emb, neg_image_emb, ("text_emb", "image_emb", "neg_image_emb")))


def _unit_rows(arrays: tuple[Any, ...], names: tuple[str, ...]) -> list[Tensor]:
    """Check ``[N, D]`` arrays of one shape and L2-normalise their rows in float64."""
    tensors = [as_embeddings(x, name) for x, name in zip(arrays, names)]
    first = tensors[0]
    for t, name in zip(tensors[1:], names[1:]):
        if t.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {names[0]} has {tuple(first.shape)}; expected one row per sample, same D")
    return [F.normalize(t.double(), dim=1) for t in tensors]


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=1)


def _mean(correct: Tensor) -> float:
    return float(correct.double().mean())
