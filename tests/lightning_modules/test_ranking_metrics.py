"""Query -> document ranking metrics against pytrec_eval (trec_eval's recip_rank, ndcg_cut, recall,
success), their torchmetrics class in one process and sharded over 2 gloo processes, and bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_modules.metrics.ranking import ranking_metrics
from lightning_modules.metrics.ranking_metric import RankingMetrics, RowChunks
from tests.helpers import gloo_group, oracle

KS = (10, 100, 1000)
N_DOCS = 1500
EMPTY_QUERY = 3  # a query without qrels
UNREACHABLE = (0, 1, 2)  # queries whose relevant documents all rank below 1000


def make_data(seed: int, distance: str, n_queries: int = 40, n_docs: int = N_DOCS, dim: int = 16):
    """Continuous random embeddings (no score ties) with rows of uneven norms (so "dot" and "cosine"
    rank differently), and qrels with 1 to 5 relevant documents at ranks spread over the whole list."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_queries, dim, generator=g, dtype=torch.float64)
    d = torch.randn(n_docs, dim, generator=g, dtype=torch.float64) * (0.5 + torch.rand(n_docs, 1, generator=g, dtype=torch.float64))
    scores = exact_scores(q, d, distance)
    order = torch.argsort(scores, dim=1, descending=True).numpy()
    rng = np.random.default_rng(seed)
    qrels: list[list[int]] = []
    for i in range(n_queries):
        if i == EMPTY_QUERY:
            qrels.append([])
        elif i in UNREACHABLE:
            qrels.append(order[i, rng.integers(min(1100, n_docs - 1), n_docs, size=2)].tolist())
        else:
            ranks = [int(rng.choice([rng.integers(0, 12), rng.integers(0, 150), rng.integers(0, n_docs)])) % n_docs for _ in range(rng.integers(1, 6))]
            qrels.append(order[i, ranks].tolist())
    return q, d, qrels, scores


def exact_scores(q: torch.Tensor, d: torch.Tensor, distance: str) -> torch.Tensor:
    """``[Q, N]`` float64 scores, written from the definition (the test's own brute force)."""
    if distance == "cosine":
        return F.normalize(q, dim=1) @ F.normalize(d, dim=1).T
    return q @ d.T


def pytrec_scores(scores: torch.Tensor, qrels: list[list[int]], ks=KS) -> dict[str, float]:
    """pytrec_eval on the brute-force run (top max(ks) documents; the run cut at 10 for MRR@10), means over its queries."""
    pytrec_eval = oracle("pytrec_eval")
    judged = {f"q{i}": {f"d{j}": 1 for j in rel} for i, rel in enumerate(qrels) if rel}
    top = torch.argsort(scores, dim=1, descending=True)
    run = {f"q{i}": {f"d{j}": float(scores[i, j]) for j in top[i, : max(ks)].tolist()} for i in range(len(scores))}
    run10 = {qid: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for qid, docs in run.items()}
    measures = {"ndcg_cut.10", "recall." + ",".join(map(str, ks)), "success.1"}
    full = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(run)
    cut = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(run10)
    assert sorted(full) == sorted(judged) == sorted(cut)  # queries without qrels are not evaluated

    def mean(results, key):
        return float(np.mean([results[qid][key] for qid in judged]))

    out = {"mrr@10": mean(cut, "recip_rank"), "ndcg@10": mean(full, "ndcg_cut_10")}
    out |= {f"recall@{k}": mean(full, f"recall_{k}") for k in ks}
    out["r@1"] = mean(full, "success_1")
    return out


def no_ties(scores: torch.Tensor, qrels: list[list[int]]) -> None:
    """Guard of the test data: each relevant document's score is far (relative to float32 rounding) from
    every other score of its query, so faiss' float32 ranking puts it where the float64 run does."""
    for i, rel in enumerate(qrels):
        for j in rel:
            gap = (scores[i] - scores[i, j]).abs()
            gap[j] = float("inf")
            assert float(gap.min()) > 1e-6 * float(scores[i].abs().max()), f"query {i}: document {j} nearly ties"


@pytest.mark.parametrize("distance", ["cosine", "dot"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ranking_metrics_match_pytrec_eval(seed: int, distance: str) -> None:
    q, d, qrels, scores = make_data(seed, distance)
    expected = pytrec_scores(scores, qrels)
    no_ties(scores, qrels)
    for i in UNREACHABLE:  # the data does what the test claims
        assert not set(qrels[i]) & set(torch.argsort(scores[i], descending=True)[:1000].tolist())
    with pytest.warns(UserWarning, match="1 queries have no relevant document"):
        got = ranking_metrics(q, d, qrels, ks=KS, distance=distance, chunk=7)
    assert list(got) == ["mrr@10", "ndcg@10", "recall@10", "recall@100", "recall@1000", "r@1"]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert 0 < got["mrr@10"] < 1 and 0 < got["recall@1000"] < 1


def test_cosine_and_dot_differ_on_rows_of_uneven_norm() -> None:
    q, d, qrels, _ = make_data(0, "dot")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ranking_metrics(q, d, qrels, distance="dot") != ranking_metrics(q, d, qrels, distance="cosine")


def test_k_larger_than_corpus_counts_the_whole_corpus() -> None:
    q, d, qrels, scores = make_data(2, "cosine", n_queries=12, n_docs=60)
    expected = pytrec_scores(scores, qrels, ks=(10, 100))  # the run holds all 60 documents
    with pytest.warns(UserWarning, match="no relevant document"):
        got = ranking_metrics(q.numpy(), d.numpy(), qrels, ks=(10, 100))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert got["recall@100"] == 1.0


def test_repeated_qrels_count_once_and_ties_go_to_the_lower_row() -> None:
    q = torch.tensor([[1.0, 0.0]])
    d = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # rows 1, 2, 3 tie under cosine
    got = ranking_metrics(q, d, [[2, 2]], ks=(1, 2))
    assert got["r@1"] == 0.0 and got["recall@2"] == 1.0 and got["mrr@10"] == 0.5  # order 1, 2, 3, 0
    assert ranking_metrics(q, d, [[3]], ks=(1,), distance="dot")["r@1"] == 1.0


def test_no_relevant_document_anywhere_gives_nan_with_warning() -> None:
    q, d, _, _ = make_data(0, "cosine", n_queries=3, n_docs=20)
    with pytest.warns(UserWarning) as record:
        got = ranking_metrics(q, d, [[], [], []], ks=(5,))
    assert [str(w.message) for w in record] == [
        "ranking_metrics: 3 queries have no relevant document and are excluded from the means",
        "ranking_metrics: no query has a relevant document; every value is NaN",
    ]
    assert all(np.isnan(v) for v in got.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.randn(3, 4), torch.randn(0, 4), [[0], [0], [0]]), "doc_emb has no rows.*corpus is empty"),
        ((torch.randn(3, 4), torch.randn(5, 4), [[0], [5], [1]]), r"qrels\[1\] names document rows \[5\] out of range; the corpus has 5 rows"),
        ((torch.randn(3, 4), torch.randn(5, 4), [[0], [-1], [1]]), r"qrels\[1\] names document rows \[-1\]"),
        ((torch.randn(3, 4), torch.randn(5, 4), [[0], [1]]), "qrels has 2 entries but q_emb has 3 rows"),
        ((torch.randn(3, 4), torch.randn(5, 4), [[0], [1.5], [1]]), r"qrels\[1\] must be a list of integer document rows"),
        ((torch.randn(3, 4), torch.randn(5, 3), [[0], [1], [1]]), "q_emb has dimension 4 but doc_emb has 3"),
        ((torch.randn(3), torch.randn(5, 4), [[0], [1], [1]]), r"q_emb must be a floating-point array \[N, D\]"),
        ((torch.randn(3, 4), torch.full((5, 4), float("nan")), [[0], [1], [1]]), "doc_emb has NaN or Inf in rows"),
    ],
)
def test_bad_input_gives_clear_errors(args, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ranking_metrics(*args)


def test_qrels_of_the_wrong_type_give_clear_errors() -> None:
    q, d = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match="qrels must be a list with one list of relevant document rows per query, got dict"):
        ranking_metrics(q, d, {"q0": {"d0": 1}, "q1": {"d1": 1}})
    with pytest.raises(TypeError, match=r"qrels\[1\] must be a list of integer document rows, got 3"):
        ranking_metrics(q, d, [[0], 3])


def test_bad_options_give_clear_errors() -> None:
    q, d = torch.randn(2, 4), torch.randn(5, 4)
    for kwargs, message in (({"distance": "euclidean"}, "distance must be one of"), ({"mrr_k": 0}, "mrr_k must be"), ({"ks": ()}, "ks must be")):
        with pytest.raises(ValueError, match=message):
            ranking_metrics(q, d, [[0], [1]], **kwargs)


def feed(metric: RankingMetrics, q: torch.Tensor, d: torch.Tensor, q_rows: torch.Tensor, d_rows: torch.Tensor, batch: int) -> None:
    for rows in d_rows.split(batch):
        metric.update_docs(d[rows].float(), rows)
    for rows in q_rows.split(batch):
        metric.update_queries(q[rows].float(), rows)


def test_metric_in_one_process_equals_the_function() -> None:
    q, d, qrels, _ = make_data(0, "cosine")
    with pytest.warns(UserWarning, match="no relevant document"):
        expected = ranking_metrics(q.float(), d.float(), qrels)
    g = torch.Generator().manual_seed(5)
    d_rows = torch.randperm(N_DOCS, generator=g)
    d_rows = torch.cat([d_rows, d_rows[:9]])  # padding repeats
    q_rows = torch.randperm(len(q), generator=g)
    q_rows = torch.cat([q_rows, q_rows[:3]])
    metric = RankingMetrics(qrels, chunk_size=16)
    feed(metric, q, d, q_rows, d_rows, batch=64)
    with pytest.warns(UserWarning, match="no relevant document"):
        got = metric.compute()
    assert {k: v.item() for k, v in got.items()} == expected
    assert all(v.dtype == torch.float64 for v in got.values())
    metric.reset()  # qrels survive reset()
    feed(metric, q, d, torch.arange(len(q)), torch.arange(N_DOCS), batch=500)
    with pytest.warns(UserWarning, match="no relevant document"):
        assert {k: v.item() for k, v in metric.compute().items()} == expected


def test_metric_errors_and_partial_corpus_warning() -> None:
    q, d = torch.randn(4, 8), torch.randn(10, 8)
    metric = RankingMetrics(ks=(5,))
    metric.update_docs(d, torch.arange(10))
    metric.update_queries(q, torch.arange(4))
    with pytest.raises(ValueError, match="no qrels; pass qrels"):
        metric.compute()
    metric.set_qrels([[0], [1], [2]])
    with pytest.raises(ValueError, match=r"query indices \[3\] have no qrels row \(qrels has 3 rows\)"):
        metric.compute()
    metric.set_qrels([[0], [1], [2], [12, 3]])
    with pytest.warns(UserWarning, match="1 of the 5 relevant documents of the evaluated queries were never passed to update_docs"):
        metric.compute()
    with pytest.raises(ValueError, match="emb has dimension 4 but earlier batches have 8"):
        metric.update_docs(torch.randn(2, 4), torch.arange(2))
    with pytest.raises(ValueError, match="index has 3 entries but emb has 2 rows"):
        metric.update_queries(torch.randn(2, 8), torch.arange(3))
    with pytest.raises(ValueError, match=r"index must be an integer tensor \[B\]"):
        metric.update_queries(torch.randn(2, 8), torch.zeros(2))
    with pytest.raises(ValueError, match=r"set_qrels: qrels\[0\] names document rows \[-2\]"):
        metric.set_qrels([[-2]])
    with pytest.raises(ValueError, match=r"sync_on_compute=True\) would gather the whole corpus"):
        RankingMetrics(sync_on_compute=True)
    empty = RankingMetrics([[0]])
    empty.update_queries(q[:1], torch.arange(1))
    with pytest.raises(ValueError, match="the corpus is empty; call update_docs"):
        empty.compute()


def test_row_chunks_is_the_concatenation() -> None:
    parts = [torch.randn(n, 3) for n in (4, 0, 7, 2)]
    whole = torch.cat(parts)
    view = RowChunks(parts)
    assert view.shape == (13, 3)
    for key in (slice(0, 13), slice(3, 9), slice(11, 40), np.array([0, 5, 12]), torch.tensor([12, 1, 6, 4])):
        torch.testing.assert_close(view[key], whole[key], rtol=0, atol=0)


def test_metric_with_ivf_index_reads_batches_without_concatenating() -> None:
    """IVF trains on rows picked by an index array (the RowChunks path); probing every cell is exact."""
    q, d, qrels, _ = make_data(1, "cosine", n_queries=12, n_docs=300)
    with pytest.warns(UserWarning, match="no relevant document"):
        expected = ranking_metrics(q.float(), d.float(), qrels, ks=(10, 100))
    metric = RankingMetrics(qrels, ks=(10, 100), index="ivf", index_kwargs={"nlist": 8, "nprobe": 8})
    feed(metric, q, d, torch.arange(12), torch.arange(300), batch=32)
    with pytest.warns(UserWarning, match="no relevant document"):
        got = metric.compute()
    assert {k: v.item() for k, v in got.items()} == pytest.approx(expected, rel=1e-12)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, q, d, qrels) -> None:
    with gloo_group(rank, world, init_file):
        # uneven splits: rank 0 holds 1000 documents and few queries, rank 1 the rest; both pad with repeats,
        # and rank 1 repeats rows rank 0 holds (kept on rank 0)
        if rank == 0:
            d_rows = torch.cat([torch.arange(0, 1000), torch.arange(0, 5)])
            q_rows = torch.cat([torch.arange(0, 7), torch.tensor([0])])
        else:
            d_rows = torch.cat([torch.arange(N_DOCS - 1, 999, -1), torch.arange(990, 1000), torch.tensor([1499])])
            q_rows = torch.cat([torch.arange(39, 6, -1), torch.tensor([2, 39])])
        metric = RankingMetrics(qrels, chunk_size=8)
        feed(metric, q, d, q_rows, d_rows, batch=37)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = {k: v.item() for k, v in metric.compute().items()}
        torch.save({"metrics": got, "local_docs": sum(len(e) for e in metric.d_emb)}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_metric_sharded_over_two_processes_equals_one_process(tmp_path: Path) -> None:
    q, d, qrels, _ = make_data(1, "cosine")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), q, d, qrels), nprocs=2)
    with pytest.warns(UserWarning, match="no relevant document"):
        expected = ranking_metrics(q.float(), d.float(), qrels)
    for rank, local_docs in ((0, 1005), (1, 511)):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["metrics"] == expected
        assert got["local_docs"] == local_docs  # compute() gathered no document embeddings
