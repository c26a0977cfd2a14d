"""``ANNRefresh``: re-mine every train query's hard-negative candidates with the model being trained (ANCE).

Xiong et al., "Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text Retrieval"
(ANCE, ICLR 2021), Sec. 3: negatives are drawn from the top of an ANN index of the corpus built with
the model being trained, and the index is refreshed as training goes, so the negatives stay hard for
the current model (static BM25 negatives become easy, their gradient norms vanish: Sec. 3.1-3.2).
ANCE refreshes **asynchronously**: a separate job re-encodes the corpus with a checkpoint while the
trainer keeps training on the previous index. Here the refresh is **synchronous**: training pauses,
the corpus is re-encoded with the current document tower, the train queries are searched with the
current query tower, and the new lists are handed to the DataModule. That costs the encoding time
(logged) but the negatives are never stale by more than the refresh period.

One refresh:

1. every rank encodes its contiguous shard of the corpus with ``pl_module.documents`` (eval mode, no
   gradient) and its shard of the train queries (all, or a seeded subset of ``max_queries``) with
   ``pl_module.query_encoder``;
2. the shared sharded search (``lightning_modules.metrics.sharded``) finds each query's top
   ``top_k + skip_top + P`` (``P``: the most positives a query has) over every rank's shard; the
   query embeddings are all-gathered so that each rank scores the (query, positive) pairs whose
   positive lies in its shard, and a MIN all-reduce gives every query's positive score ``s(q, d+)``
   (the hardest positive, the anchor of ``PositiveAwareFilter`` and ``SimANSSampler``);
3. known positives are removed (their share of the top ``top_k + skip_top`` is logged as
   ``train/ann_positive_fraction``), the first ``skip_top`` survivors are skipped (the very top is
   where unlabelled positives sit), the next ``top_k`` are kept with their scores;
4. the lists of all queries are all-gathered, so every rank calls ``datamodule.set_candidates`` with
   the same arrays (the DataModule versions them; its ``negative_sampler`` draws the epoch's ``k``).

Scores are cosine similarities (``distance="cosine"``) or inner products (``"dot"``); default: the
module's ``eval_distance``. Logged: ``train/ann_refresh_seconds`` (the whole refresh),
``train/ann_mining_seconds`` (search and list building, without encoding), ``train/ann_positive_fraction``.
Every refresh's numbers are also kept in ``history``.

Cost controls (neither changes which negatives a query gets):

- ``queries="epoch"`` refreshes only the train queries the coming epoch's batches draw (on any rank),
  read from the DataModule's seeded batch sampler; the other queries' lists would be replaced before
  they are used. A 40-step run over 65k WordNet queries encodes 1,280 of them instead of 65,691.
- ``corpus_cache=<dir>`` keeps the initial document tower's corpus embeddings on disk and reads them
  back when an identical tower asks again (``experiments.callbacks.corpus_cache``): every run of a grid
  that starts from the same checkpoint encodes the corpus for its first refresh once, not once per run.

Resuming: the candidate lists are not in the checkpoint (for MS MARCO they would add a gigabyte to
every checkpoint); the refresh history is. A run resumed after a refresh had happened (or with
``first="untrained"``) refreshes once at train start with the restored model, for the restored epoch,
so that it never trains on the static lists by mistake.

When: ``first="untrained"`` refreshes at fit start (before the first epoch's iterator exists) with
the initial model; ``first="file"`` trains the first ``every_n_epochs`` epochs on the DataModule's
static candidates. Then every ``every_n_epochs`` epochs (at the epoch start, before Lightning creates
the epoch's iterator, so the whole epoch uses the new lists) and/or every ``every_n_steps`` optimizer
steps (the lists apply from the next batch the loader's sampler yields; see ``datamodules.candidate_store``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from contracts.arguments import is_int_at_least
from experiments.callbacks.corpus_cache import corpus_cache_file, load_cached, save_cached

FIRST = ("untrained", "file")
QUERIES = ("all", "epoch")
DISTANCES = ("cosine", "dot")


class ANNRefresh(L.Callback):
    """Refresh the train queries' candidates from an index of the corpus under the current model (module docstring).

    Args:
        every_n_epochs: refresh at the start of every ``n``-th epoch (``None``: never by epoch).
        every_n_steps: refresh after every ``n``-th optimizer step (``None``: never by step).
        top_k: candidates kept per query (after removing positives and ``skip_top``); the sampler draws
            the epoch's ``k`` from them (ANCE samples from the top 200; SimANS from the top 100).
        first: ``"untrained"`` (refresh at fit start) or ``"file"`` (the DataModule's static candidates
            until the first scheduled refresh).
        skip_top: non-positive candidates skipped at the top of each list (0: none, as ANCE).
        max_queries: refresh only a seeded subset of this many train queries (the others keep their
            candidates); ``None``: all of them.
        distance: ``"cosine"`` or ``"dot"`` (``None``: the module's ``hparams.eval_distance``, else cosine).
        batch_size: texts per encoder forward (``None``: the DataModule's ``eval_batch_size``).
        index, chunk, index_kwargs: the faiss index kind and query chunk of the shared search helper.
        seed: the seed of the ``max_queries`` subset.
        queries: ``"all"`` train queries (or the ``max_queries`` subset), or ``"epoch"``: those the coming
            epoch's batches draw (epoch-scheduled refreshes only; the DataModule's own seeded sampler).
        corpus_cache: a directory for the initial document tower's corpus embeddings (module docstring).
    """

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        top_k: int = 200,
        first: Literal["untrained", "file"] = "untrained",
        skip_top: int = 0,
        max_queries: int | None = None,
        distance: Literal["cosine", "dot"] | None = None,
        batch_size: int | None = None,
        index: Literal["flat", "ivf", "hnsw"] = "flat",
        chunk: int = 4096,
        index_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        queries: Literal["all", "epoch"] = "all",
        corpus_cache: str | None = None,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps), ("max_queries", max_queries),
                            ("batch_size", batch_size)):
            if value is not None and not is_int_at_least(value, 1):
                raise ValueError(f"ANNRefresh: {name} must be a positive integer or None, got {value!r}")
        if top_k < 1:
            raise ValueError(f"ANNRefresh: top_k must be >= 1, got {top_k}")
        if skip_top < 0:
            raise ValueError(f"ANNRefresh: skip_top must be >= 0, got {skip_top}")
        if first not in FIRST:
            raise ValueError(f"ANNRefresh: first must be one of {FIRST}, got {first!r}")
        if distance is not None and distance not in DISTANCES:
            raise ValueError(f"ANNRefresh: distance must be one of {DISTANCES} or None, got {distance!r}")
        if every_n_epochs is None and every_n_steps is None and first == "file":
            raise ValueError("ANNRefresh: with every_n_epochs=None, every_n_steps=None and first='file' it would never refresh")
        self.every_n_epochs, self.every_n_steps, self.top_k, self.first = every_n_epochs, every_n_steps, top_k, first
        self.skip_top, self.max_queries, self.distance, self.batch_size = skip_top, max_queries, distance, batch_size
        self.index, self.chunk, self.index_kwargs, self.seed = index, chunk, dict(index_kwargs or {}), seed
        if queries not in QUERIES:
            raise ValueError(f"ANNRefresh: queries must be one of {QUERIES}, got {queries!r}")
        if queries == "epoch" and (every_n_steps is not None or max_queries is not None):
            raise ValueError("ANNRefresh: queries='epoch' refreshes the queries of a whole coming epoch; it cannot be combined with "
                             "every_n_steps (a refresh inside an epoch) or max_queries (another subset)")
        self.queries, self.corpus_cache = queries, corpus_cache
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None
        self._refreshed_at: tuple[int, int] | None = None  # (epoch, step) of this process's latest refresh

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]

    # ---------------------------------------------------------------------------------- when
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.first == "untrained" and trainer.ckpt_path is None:  # resuming: on_train_start, once epoch and step are restored
            self._log_now(trainer, self.refresh(trainer, pl_module))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and (self.first == "untrained" or self.history):
            self._log_now(trainer, self.refresh(trainer, pl_module))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0
                and self._refreshed_at != (epoch, trainer.global_step)):  # not again right after a resume's refresh
            self._log(pl_module, self.refresh(trainer, pl_module))

    @staticmethod
    def _log_now(trainer: L.Trainer, stats: dict[str, float]) -> None:
        for logger in trainer.loggers:  # self.log is not allowed outside the training hooks
            if trainer.is_global_zero:
                logger.log_metrics(stats, step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step  # several batches per optimizer step (accumulation) refresh once
            self._log(pl_module, self.refresh(trainer, pl_module))

    @staticmethod
    def _log(pl_module: L.LightningModule, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            pl_module.log(name, value, batch_size=1)

    # ---------------------------------------------------------------------------------- what
    @torch.no_grad()
    def refresh(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """One refresh (module docstring); collective under DDP. Returns the logged numbers."""
        from lightning_modules.metrics.sharded import sharded_search  # faiss only when a refresh runs

        start = time.perf_counter()
        dm = trainer.datamodule
        if dm is None or not callable(getattr(dm, "set_candidates", None)):
            raise TypeError(f"ANNRefresh needs a datamodules.QueryDocDataModule (with set_candidates); the trainer has "
                            f"{type(dm).__name__ if dm is not None else 'no datamodule'}")
        for name in ("query_encoder", "documents"):
            if not isinstance(getattr(pl_module, name, None), nn.Module):
                raise TypeError(f"ANNRefresh needs a dual-encoder module with .query_encoder and .documents (DualEncoderModule); "
                                f"{type(pl_module).__name__} has no {name}")
        dm.prepare_splits()
        if getattr(dm, "query_collate_fn", None) is None:
            dm.setup("fit")
        split = dm.split("fit")
        corpus, qrels = dm.data.corpus, split.qrels
        n_docs, n_train = len(corpus), len(split.queries)
        rank, world = self._rank_world(trainer)
        distance = self.distance or dict(getattr(pl_module, "hparams", {})).get("eval_distance") or "cosine"
        batch_size = self.batch_size or int(getattr(dm, "eval_batch_size", 256))

        subset = np.arange(n_train, dtype=np.int64)
        if self.max_queries is not None and self.max_queries < n_train:
            subset = np.sort(np.random.default_rng(self.seed).choice(n_train, size=self.max_queries, replace=False))
        if self.queries == "epoch":
            subset = _epoch_rows(dm, trainer.current_epoch, world)
        doc_lo, doc_hi = _block(n_docs, rank, world)
        q_lo, q_hi = _block(len(subset), rank, world)
        was_training = pl_module.training
        pl_module.eval()
        try:
            doc_emb, cache_file = None, None
            if self.corpus_cache is not None:
                cache_file = corpus_cache_file(self.corpus_cache, pl_module.documents, dm.doc_collate_fn, n_docs, doc_lo, doc_hi)
                doc_emb = load_cached(cache_file, doc_hi - doc_lo)
            if doc_emb is None:
                doc_emb = _encode(pl_module.documents, [corpus[i] for i in range(doc_lo, doc_hi)], dm.doc_collate_fn, batch_size,
                                  pl_module.device)
                if cache_file is not None and trainer.global_step == 0:  # only the initial tower is shared across runs
                    save_cached(cache_file, doc_emb)
            q_emb = _encode(pl_module.query_encoder, [split.queries[int(i)] for i in subset[q_lo:q_hi]], dm.query_collate_fn, batch_size,
                            pl_module.device)
        finally:
            pl_module.train(was_training)
        dim = int(doc_emb.shape[1]) if len(doc_emb) else int(q_emb.shape[1]) if len(q_emb) else 0
        dim = int(_all_reduce(np.array([dim], dtype=np.float64), "max", world)[0])
        doc_emb, q_emb = _fix_dim(doc_emb, dim), _fix_dim(q_emb, dim)

        mining_start = time.perf_counter()
        normalize = distance == "cosine"
        pos_lists = [list(qrels[int(q)]) for q in subset]
        max_pos = max((len(set(p)) for p in pos_lists), default=0)
        depth = min(self.top_k + self.skip_top + max_pos, n_docs)
        scores, ids = sharded_search(q_emb, doc_emb, depth, reference_ids=np.arange(doc_lo, doc_hi), metric="ip", index=self.index,
                                     chunk=self.chunk, distributed=world > 1, normalize=normalize, **self.index_kwargs)
        # every rank gets every query's embedding, scores the positives in its shard; MIN over ranks
        all_q = _all_gather_rows(q_emb, world)
        if normalize and len(all_q):
            all_q = all_q / np.maximum(np.linalg.norm(all_q, axis=1, keepdims=True), 1e-12)
        pos_scores = np.full(len(subset), np.inf, dtype=np.float64)
        for qi, positives in enumerate(pos_lists):
            mine = [p for p in positives if doc_lo <= p < doc_hi]
            if mine:
                d = doc_emb[np.asarray(mine) - doc_lo].astype(np.float64)
                if normalize:
                    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
                pos_scores[qi] = float((d @ all_q[qi].astype(np.float64)).min())
        pos_scores = _all_reduce(pos_scores, "min", world)

        rows, cand_scores, n_pos, n_seen = self._lists(ids, scores, pos_lists[q_lo:q_hi])
        rows, cand_scores = _all_gather_rows(rows, world), _all_gather_rows(cand_scores, world)
        n_pos, n_seen = _all_reduce(np.array([n_pos, n_seen], dtype=np.float64), "sum", world)
        mining_seconds = time.perf_counter() - mining_start
        pos_scores = np.where(np.isfinite(pos_scores), pos_scores, np.nan).astype(np.float32)
        dm.set_candidates(rows, cand_scores, pos_scores, query_rows=None if len(subset) == n_train else subset)
        stats = {
            "train/ann_refresh_seconds": time.perf_counter() - start,
            "train/ann_mining_seconds": mining_seconds,
            "train/ann_positive_fraction": float(n_pos / max(n_seen, 1.0)),
        }
        self._refreshed_at = (trainer.current_epoch, trainer.global_step)
        self.history.append({**stats, "epoch": float(trainer.current_epoch), "step": float(trainer.global_step), "queries": float(len(subset))})
        return stats

    def _lists(self, ids: np.ndarray, scores: np.ndarray, positives: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, int, int]:
        """``(rows [q, top_k], scores [q, top_k], positives among the top, candidates seen)``: positives removed, ``skip_top`` skipped."""
        n = len(ids)
        rows = np.full((n, self.top_k), -1, dtype=np.int64)
        out_scores = np.full((n, self.top_k), np.nan, dtype=np.float32)
        if n == 0:
            return rows, out_scores, 0, 0
        width = max(int(ids.max()), max((max(p) for p in positives if len(p)), default=0), 0) + 2
        keys = np.arange(n, dtype=np.int64)[:, None] * width + np.where(ids >= 0, ids, -width)
        pos_keys = np.fromiter((r * width + int(p) for r, ps in enumerate(positives) for p in ps), dtype=np.int64)
        is_pos = np.isin(keys, pos_keys) & (ids >= 0)
        seen = min(self.top_k + self.skip_top, ids.shape[1])
        n_pos, n_seen = int(is_pos[:, :seen].sum()), int((ids[:, :seen] >= 0).sum())
        usable = (ids >= 0) & ~is_pos
        order = np.argsort(~usable, axis=1, kind="stable")  # usable first, in rank order
        kept_ids, kept_scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
        kept_ok = np.take_along_axis(usable, order, 1)
        window = slice(self.skip_top, self.skip_top + self.top_k)
        part_ids, part_scores, part_ok = kept_ids[:, window], kept_scores[:, window], kept_ok[:, window]
        rows[:, : part_ids.shape[1]] = np.where(part_ok, part_ids, -1)
        out_scores[:, : part_ids.shape[1]] = np.where(part_ok, part_scores, np.nan)
        return rows, out_scores, n_pos, n_seen

    @staticmethod
    def _rank_world(trainer: L.Trainer) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            return dist.get_rank(), dist.get_world_size()
        return 0, 1


def _epoch_rows(dm: Any, epoch: int, world: int) -> np.ndarray:
    """The sorted train query rows that epoch ``epoch``'s batches draw on any rank (the DataModule's seeded sampler)."""
    if getattr(dm, "batch_sampler", None) is not None:
        raise ValueError(f"ANNRefresh(queries='epoch') reads the epoch's queries from {type(dm).__name__}'s own seeded batch sampler; "
                         f"this DataModule has an injected batch_sampler ({dm.batch_sampler!r}), whose batches may depend on training "
                         f"state: use queries='all'")
    sampler = dm.train_sampler()
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
    rows = np.unique(np.fromiter((int(i) for batch in sampler for i in batch), dtype=np.int64))
    return np.unique(_all_gather_rows(rows, world)) if world > 1 else rows


def _block(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of ``range(n)`` (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def _encode(encoder: nn.Module, texts: list[str], collate: Any, batch_size: int, device: torch.device) -> np.ndarray:
    """``[len(texts), D]`` float32 embeddings of ``texts`` tokenized by ``collate`` (a ``TokenizeCollate``),
    in the order of ``texts``. Batches are formed longest first, so that a batch pads to similar lengths
    (in a random order one long text pads 511 short ones: WordNet's corpus encodes several times slower)."""
    from datamodules.query_doc_data import text_lengths
    from lightning_modules.dual_encoder_module import tokens

    order = np.argsort(-text_lengths(texts), kind="stable")
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = collate([{"text": texts[int(i)]} for i in order[start : start + batch_size]])
        parts.append(encoder({k: v.to(device) for k, v in tokens(batch).items()}).float().cpu().numpy())
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
    out[order] = np.concatenate(parts)
    return out


def _fix_dim(x: np.ndarray, dim: int) -> np.ndarray:
    return x if x.shape[1:] == (dim,) else np.zeros((0, dim), dtype=np.float32)


def _all_gather_rows(x: np.ndarray, world: int) -> np.ndarray:
    """Every rank's ``x [n_r, ...]`` concatenated in rank order (sizes may differ); ``x`` itself on one process."""
    if world == 1:
        return x
    from lightning_modules.metrics.sharded import comm_device

    device = comm_device()
    t = torch.from_numpy(np.ascontiguousarray(x))
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(t)], device=device))
    sizes = [int(s) for s in sizes]
    as_float = t.dtype in (torch.float32, torch.float64)
    payload = (t.double() if as_float else t.long()).to(device)
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=payload.dtype, device=device)
    padded[: len(t)] = payload
    bucket = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bucket, padded)
    out = torch.cat([b[:s] for b, s in zip(bucket, sizes)]).cpu().numpy()
    return out.astype(x.dtype)


def _all_reduce(x: np.ndarray, op: str, world: int) -> np.ndarray:
    if world == 1:
        return x
    from lightning_modules.metrics.sharded import comm_device

    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(comm_device())
    dist.all_reduce(t, op=ops[op])
    return t.cpu().numpy()
