"""``ADOREModule``: dynamic hard negatives retrieved at every step from a fixed document index (ADORE).

Zhan et al., "Optimizing Dense Retrieval Model Training with Hard Negatives" (SIGIR 2021), Sec. 5
(ADORE, "Algorithm Directly Optimizing Ranking pErformance"): the document encoder is **frozen**
and the corpus is encoded and indexed **once**; at every training step the batch's queries, encoded
by the *current* query encoder, are searched in that index, and the top-``k`` retrieved documents
that are not relevant become the step's negatives. The negatives are thus the real top of the
ranking the query tower currently produces (what it will be evaluated on), with no stale index and
no document forward pass: the negatives' and positives' embeddings are the stored ones.

The paper's loss is a pairwise LambdaRank-style loss over the retrieved list, each (positive,
negative) pair weighted by the change of the ranking metric (MRR@10 / Recall) a swap would cause
(Sec. 5.2). **That weighting is not implemented here**: the negatives go to the shared step as
extra references (``neg_emb``, relevance by ids), so any loss of the zoo trains on them; with a
two-view ``losses.CLIPLoss(symmetric=False)`` it is InfoNCE over the in-batch positives and the
retrieved negatives (the listwise softmax cross-entropy over the retrieved list plus in-batch
documents), with ``TripletMarginLoss`` a pairwise hinge.

Index: built at ``on_fit_start`` from ``corpus_embeddings`` (a ``.npy`` of ``[N, D]`` document
embeddings in corpus-row order, e.g. saved by a previous run with ``numpy.save(path,
module.corpus_embeddings.numpy())``) or by encoding the DataModule's corpus with the frozen document
tower (each rank its contiguous block, then all-gathered: every rank holds the whole index, as the
paper's single GPU index; the search of a step's queries is local). Cosine (``eval_distance="cosine"``:
the index holds normalised vectors) or inner product (``"dot"``).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

import faiss
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from contracts.index import as_float32, build_index
from lightning_modules.dual_encoder_module import DualEncoderModule, tokens


class ADOREModule(DualEncoderModule):
    """A dual encoder whose document tower is frozen and whose negatives are retrieved per step (module docstring).

    Args:
        query_encoder: the trained tower. loss: any loss (two-view ``CLIPLoss`` = InfoNCE over the retrieved).
        doc_encoder: the frozen tower (``None``: a frozen copy of ``query_encoder``'s initial weights,
            as ADORE starts both towers from one warm-up model).
        num_negatives: ``k`` retrieved non-positive documents per query per step (the paper retrieves
            the top 200 for its pairwise loss).
        corpus_embeddings: ``.npy`` file of the ``[N, D]`` corpus embeddings (``None``: encode at fit start).
        index: faiss index kind of ``contracts.index.build_index`` (``"flat"``: exact).
        encode_batch_size: texts per forward when encoding the corpus.
        index_kwargs: more ``build_index`` arguments (``nlist``, ``nprobe``, ``hnsw_m`` ...).
        **kwargs: ``DualEncoderModule``'s (``temperature``, ``gather``, ``optimizer``, ``eval_distance`` ...).

    The DataModule should have ``num_negatives=0``: a batch's static ``neg_*`` block is ignored.
    """

    def __init__(
        self,
        query_encoder: nn.Module,
        loss: nn.Module,
        doc_encoder: nn.Module | None = None,
        num_negatives: int = 8,
        corpus_embeddings: str | None = None,
        index: Literal["flat", "ivf", "hnsw"] = "flat",
        encode_batch_size: int = 256,
        index_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if num_negatives < 1:
            raise ValueError(f"ADOREModule: num_negatives must be >= 1 (documents retrieved per query per step), got {num_negatives}")
        if corpus_embeddings is not None and not os.path.isfile(corpus_embeddings):
            raise FileNotFoundError(f"ADOREModule: corpus_embeddings={corpus_embeddings!r} is not a file; expected a .npy of [N, D] "
                                    f"document embeddings in corpus-row order")
        frozen = doc_encoder if doc_encoder is not None else copy.deepcopy(query_encoder)
        if frozen is query_encoder:
            raise ValueError("ADOREModule: doc_encoder is the query encoder itself; ADORE freezes the document tower, so it must be a separate module")
        super().__init__(query_encoder, loss, doc_encoder=frozen, **kwargs)
        self.doc_encoder.requires_grad_(False)
        self.doc_encoder.eval()
        self.num_negatives, self.corpus_embeddings_path, self.index_kind = num_negatives, corpus_embeddings, index
        self.encode_batch_size, self.index_kwargs = encode_batch_size, dict(index_kwargs or {})
        self.corpus_embeddings: Tensor | None = None
        self.index: faiss.Index | None = None

    def train(self, mode: bool = True) -> ADOREModule:
        super().train(mode)
        self.doc_encoder.eval()  # frozen: no dropout, no batch-norm statistics updates
        return self

    @property
    def cosine(self) -> bool:
        return self.hparams.get("eval_distance", "cosine") == "cosine"

    # ------------------------------------------------------------------------------- the index
    def on_fit_start(self) -> None:
        if self.index is None:
            self.build_index(self.load_or_encode_corpus())

    def build_index(self, embeddings: Tensor | np.ndarray) -> None:
        """Index ``embeddings [N, D]`` (corpus-row order) and keep them for the negatives' ``neg_emb``."""
        emb = torch.as_tensor(as_float32(embeddings))
        if emb.dim() != 2 or len(emb) == 0:
            raise ValueError(f"ADOREModule: corpus embeddings must be a non-empty [N, D] array, got shape {tuple(emb.shape)}")
        self.corpus_embeddings = emb
        self.index = build_index(emb, "ip", self.index_kind, normalize=self.cosine, **self.index_kwargs)

    @torch.no_grad()
    def load_or_encode_corpus(self) -> Tensor:
        """The ``[N, D]`` corpus embeddings: from ``corpus_embeddings``, else encoded by the frozen tower."""
        dm = self.trainer.datamodule
        n_docs = len(dm.data.corpus) if dm is not None and getattr(dm, "data", None) is not None else None
        if self.corpus_embeddings_path is not None:
            emb = np.load(self.corpus_embeddings_path, mmap_mode="r")
            if emb.ndim != 2 or (n_docs is not None and emb.shape[0] != n_docs):
                raise ValueError(f"ADOREModule: {self.corpus_embeddings_path} holds an array of shape {emb.shape}; expected "
                                 f"[{n_docs if n_docs is not None else 'N'}, D], one row per corpus document in corpus-row order")
            return torch.from_numpy(np.array(emb, dtype=np.float32))
        if n_docs is None:
            raise ValueError("ADOREModule: no corpus_embeddings file and no query/document DataModule to encode the corpus from")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        lo, hi = n_docs * rank // world, n_docs * (rank + 1) // world
        parts = []
        for start in range(lo, hi, self.encode_batch_size):
            batch = dm.doc_collate_fn([{"text": dm.data.corpus[i]} for i in range(start, min(start + self.encode_batch_size, hi))])
            parts.append(self.doc_encoder({k: v.to(self.device) for k, v in tokens(batch).items()}).float())
        dim = int(getattr(self.doc_encoder, "embed_dim", 0)) or (parts[0].shape[1] if parts else 0)
        mine = torch.cat(parts) if parts else torch.zeros(0, dim, device=self.device)
        if world == 1:
            return mine.cpu()
        sizes = [n_docs * (r + 1) // world - n_docs * r // world for r in range(world)]
        padded = torch.zeros(max(sizes), mine.shape[1], device=mine.device)
        padded[: len(mine)] = mine
        bucket = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(bucket, padded)
        return torch.cat([b[:s] for b, s in zip(bucket, sizes)]).cpu()

    @torch.no_grad()
    def retrieve(self, queries: Tensor, pos_idx: Tensor) -> Tensor:
        """``[B, k]`` corpus rows: each query's top-``k`` retrieved documents that are not among its
        ``pos_idx [B, P]`` (``-1`` padded); ``-1`` where fewer exist."""
        if self.index is None:
            raise RuntimeError("ADOREModule: the corpus index is not built; it is built at fit start (or call build_index(embeddings))")
        k = self.num_negatives
        depth = min(k + pos_idx.shape[1], self.index.ntotal)
        _, ids = self.index.search(as_float32(queries, normalize=self.cosine), depth)
        ids = torch.from_numpy(ids)
        pos = pos_idx.cpu().long()
        is_pos = (ids.unsqueeze(2) == pos.unsqueeze(1)).any(2) | (ids < 0)
        order = torch.sort(is_pos.to(torch.int8), dim=1, stable=True).indices  # non-positives first, in rank order
        ids, ok = torch.gather(ids, 1, order), ~torch.gather(is_pos, 1, order)
        out = torch.where(ok, ids, torch.tensor(-1))[:, :k]
        if out.shape[1] < k:
            out = torch.cat([out, out.new_full((len(out), k - out.shape[1]), -1)], 1)
        return out

    # ---------------------------------------------------------------------------------- train
    def encoder_passes(self, batch: dict[str, Tensor]) -> list[tuple[nn.Module, Any]]:
        return [(self.query_encoder, tokens(batch, "query_"))]  # documents come from the index

    def step_inputs_from(self, batch: dict[str, Tensor], *embeddings: Tensor) -> dict[str, Any]:
        (q,) = embeddings
        negs = self.retrieve(q.detach(), batch["pos_idx"])
        corpus = self.corpus_embeddings
        ref = corpus[batch["doc_idx"].cpu().long()].to(q.device, q.dtype)
        neg = corpus[negs.clamp(min=0).reshape(-1)].to(q.device, q.dtype)
        inputs: dict[str, Any] = {"emb": q, "ref_emb": ref, "pos_ids": batch["pos_idx"], "ref_ids": batch["doc_idx"],
                                  "neg_emb": neg, "neg_ids": negs.reshape(-1).to(q.device)}
        if self.step.two_view:
            inputs["loss_kwargs"] = {"logit_scale": self.logit_scale.exp()}
        self._last_negatives = negs
        return inputs
