"""Evaluation sharded across ranks (gloo, 2 and 3 CPU processes): no rank gathers the embeddings, and
the result equals one process over everything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from contracts.index import search
from lightning_modules.metrics import QueryGalleryRetrievalMetrics, RetrievalMetrics, retrieval_metrics
from lightning_modules.metrics.sharded import sharded_search
from tests.helpers import gloo_group
from tests.lightning_modules.test_metrics import KS, clustered


def _search_worker(rank: int, world: int, init_file: str, out_dir: str, queries, reference, splits, q_splits) -> None:
    with gloo_group(rank, world, init_file):
        part = splits[rank]
        results = {}
        for metric in ("ip", "l2"):
            results[metric] = sharded_search(
                queries[q_splits[rank]], reference[part], 9, reference_ids=part, metric=metric, chunk=4
            )
        torch.save(results, Path(out_dir) / f"search{rank}.pt")


@pytest.mark.slow
def test_sharded_search_equals_one_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((23, 8)).astype(np.float32)
    reference = rng.standard_normal((40, 8)).astype(np.float32)
    perm = rng.permutation(40)  # shards are arbitrary subsets; one shard is smaller than k
    splits = [np.sort(perm[:30]), np.sort(perm[30:35]), np.sort(perm[35:])]
    q_splits = [np.arange(0, 10), np.arange(10, 10), np.arange(10, 23)]  # rank 1 has no queries
    mp.spawn(_search_worker, args=(3, str(tmp_path / "init"), str(tmp_path), queries, reference, splits, q_splits), nprocs=3)
    for metric in ("ip", "l2"):
        scores, ids = search(queries, reference, 9, metric)
        got = [torch.load(tmp_path / f"search{r}.pt", weights_only=False)[metric] for r in range(3)]
        np.testing.assert_array_equal(np.concatenate([g[1] for g in got]), ids)
        np.testing.assert_array_equal(np.concatenate([g[0] for g in got]), scores)


def _metric_worker(rank: int, world: int, init_file: str, out_dir: str, emb, labels, is_query) -> None:
    with gloo_group(rank, world, init_file):
        # uneven, interleaved shards with a repeated row (padding) and dataset indices
        rows = torch.arange(len(emb))[rank::world]
        rows = torch.cat([rows, rows[:2]]) if rank == 0 else rows
        sharded = RetrievalMetrics(ks=KS, nmi=True, chunk_size=8)
        gathered = RetrievalMetrics(ks=KS, nmi=True, chunk_size=8, sharded=False)
        qg = QueryGalleryRetrievalMetrics(ks=KS, distance="euclidean", chunk_size=8)
        for chunk in rows.split(16):
            for m in (sharded, gathered):
                m.update(emb[chunk], labels[chunk], index=chunk)
            qg.update(emb[chunk], labels[chunk], is_query[chunk], index=chunk)
        results = {"sharded": sharded.compute(), "gathered": gathered.compute(), "query_gallery": qg.compute()}
        # compute() left the states as they were: this rank's rows only, nothing gathered
        results["local_rows"] = sum(len(e) for e in sharded.emb)
        torch.save(results, Path(out_dir) / f"metric{rank}.pt")


@pytest.mark.slow
def test_sharded_metrics_equal_one_process_and_keep_embeddings_local(tmp_path: Path) -> None:
    emb, labels = clustered(9, n=150)
    is_query = torch.arange(150) % 4 == 0
    mp.spawn(_metric_worker, args=(2, str(tmp_path / "init"), str(tmp_path), emb, labels, is_query), nprocs=2)
    expected = retrieval_metrics(emb, labels, ks=KS, nmi=True)
    expected_qg = retrieval_metrics(emb[is_query], labels[is_query], emb[~is_query], labels[~is_query], ks=KS, distance="euclidean")
    for rank, local_rows in ((0, 77), (1, 75)):
        got = torch.load(tmp_path / f"metric{rank}.pt", weights_only=False)
        assert got["sharded"] == expected
        assert got["gathered"] == expected
        assert got["query_gallery"] == expected_qg
        assert got["local_rows"] == local_rows


def test_sharded_with_gather_on_compute_is_refused() -> None:
    with pytest.raises(ValueError, match="sharded=False"):
        RetrievalMetrics(sync_on_compute=True)
