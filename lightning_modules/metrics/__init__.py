"""Evaluation: retrieval metrics on one shared faiss index helper, sharded across DDP ranks.

Files, one concept each:

- :mod:`contracts.index` (below miners too, which mine with it): the faiss helper (``build_index``, ``search``, ``iter_search``, ``merge_topk``,
  ``kmeans``): flat / IVF / HNSW, inner product or L2, GPU when present, bounded memory.
- :mod:`.sharded`: ``sharded_search``: a reference set split across ranks, top-k lists merged.
- :mod:`.knn_scores`: Recall@K, Precision@1, R-Precision, MAP@R from neighbour lists.
- :mod:`.nmi`: NMI of labels against k-means.
- :mod:`.retrieval`: ``retrieval_metrics``, the pure function for embeddings in memory.
- :mod:`.embedding_store`, :mod:`.retrieval_metric`, :mod:`.query_gallery`: the torchmetrics
  ``Metric`` classes ``RetrievalMetrics`` (a set against itself: CUB, Cars, SOP) and
  ``QueryGalleryRetrievalMetrics`` (In-Shop).
- :mod:`.ranking`: ``ranking_metrics``: MRR@10, nDCG@10, Recall@K, R@1 of query -> document
  retrieval (pytrec_eval's definitions), the pure function and its driver.
- :mod:`.ranking_metric`: ``RankingMetrics``, the same as a ``Metric`` with the corpus sharded across ranks.
- :mod:`.image_text`: image <-> text Recall@K with several captions per image (clip_benchmark's
  rule), as a function and a ``Metric`` class.
- :mod:`.zero_shot`: CLIP's zero-shot classification accuracy, as a function and a ``Metric`` class.
- :mod:`.compositional`: SugarCrepe / SugarCrepe++ scores and text -> image negative-image accuracy.

Names are loaded on first use, so ``contracts.index`` does not import torchmetrics.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "retrieval_metrics": "retrieval",
    "normalized_mutual_info": "nmi",
    "RetrievalMetrics": "retrieval_metric",
    "QueryGalleryRetrievalMetrics": "query_gallery",
    "EmbeddingStore": "embedding_store",
    "search": "contracts.index",
    "build_index": "contracts.index",
    "kmeans": "contracts.index",
    "sharded_search": "sharded",
    "ranking_metrics": "ranking",
    "RankingMetrics": "ranking_metric",
    "image_text_retrieval": "image_text",
    "zero_shot_accuracy": "zero_shot",
    "zero_shot_classifier": "zero_shot",
    "ImageTextRetrievalMetrics": "image_text",
    "ZeroShotAccuracy": "zero_shot",
    "sugarcrepe_accuracy": "compositional",
    "sugarcrepe_pp_scores": "compositional",
    "negative_image_accuracy": "compositional",
    "pairwise_correct": "compositional",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
