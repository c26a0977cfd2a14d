"""The corpus-embedding cache of ``ANNRefresh``: a document tower's corpus embeddings on disk, keyed by the tower.

An ANN refresh (``experiments.callbacks.ann_refresh``) re-encodes the whole corpus, the costly part
of a refresh. With ``corpus_cache=<dir>`` the embeddings of a document tower are kept on disk under
a fingerprint of its weights, the shard and the tokenizer settings (:func:`corpus_cache_file`), and
read back when an identical tower asks again: every run of a grid that starts from the same
checkpoint encodes the corpus for its first refresh once, not once per run. Later refreshes (a
trained tower) miss and are not written (the callback writes only at step 0).

Files are ``corpus-<fingerprint>-<lo>-<hi>.npy`` (``[hi - lo, D]`` float32, rows ``lo .. hi - 1`` of
the corpus: one file per rank's shard), written atomically (``experiments.atomic.atomic_write``), so
grid cells running side by side never read a half-written file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from experiments.atomic import atomic_write


def corpus_cache_file(directory: str, encoder: nn.Module, collate: Any, n_docs: int, lo: int, hi: int) -> str:
    """The cache file of rows ``lo .. hi - 1`` of an ``n_docs``-document corpus encoded by ``encoder`` after ``collate``."""
    return os.path.join(directory, f"corpus-{fingerprint(encoder, collate, n_docs)}-{lo}-{hi}.npy")


def fingerprint(encoder: nn.Module, collate: Any, n_docs: int) -> str:
    """A hash of the tower's parameters and buffers, the tokenizer settings and the corpus size."""
    import hashlib

    h = hashlib.sha256(f"{n_docs}".encode())
    for name, tensor in encoder.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    settings = {k: v for k, v in sorted(vars(collate).items()) if isinstance(v, (int, float, str, bool, type(None)))} if hasattr(collate, "__dict__") else {}
    h.update(repr(settings).encode())
    return h.hexdigest()[:20]


def load_cached(path: str, n: int) -> np.ndarray | None:
    """The ``[n, D]`` embeddings cached at ``path``, or None without a file; a file of another shape is an error."""
    if not os.path.exists(path):
        return None
    emb = np.load(path)
    if emb.ndim != 2 or len(emb) != n:
        raise ValueError(f"ANNRefresh: cached corpus embeddings {path} have shape {emb.shape}; expected [{n}, D] (delete the file)")
    return emb


def save_cached(path: str, emb: np.ndarray) -> None:
    """Write ``emb`` to ``path`` atomically (a reader sees the old file or the whole new one)."""
    atomic_write(path, lambda f: np.save(f, emb), mode="wb")
