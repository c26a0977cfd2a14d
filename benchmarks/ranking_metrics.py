"""Time and peak memory of ``ranking_metrics`` against a bare faiss search, and against that search
followed by pytrec_eval (the usual way MRR@10 / nDCG@10 / Recall@K are computed).

    python benchmarks/ranking_metrics.py                        # 6,980 queries (MS MARCO dev small), 200k documents, D = 384
    python benchmarks/ranking_metrics.py --queries 2000 --docs 50000 --dim 128

Synthetic data: Gaussian documents, each query a noisy copy of one to three of them (its qrels).
``bare`` is the search any implementation needs: one ``faiss.IndexFlatIP`` over the L2-normalised
documents and one ``search`` of every query for the top ``max(ks)``. ``pytrec`` is ``bare`` plus
building the run dict and evaluating it with pytrec_eval (``recip_rank`` on the run cut at 10,
``ndcg_cut_10``, ``recall_K``, ``success_1``). ``ours`` is
``lightning_modules.metrics.ranking.ranking_metrics`` (checks, chunked normalisation and search on
the shared index helper, scoring). Each runs in a fresh subprocess: memory is the peak resident set
size during the call minus the resident size just before it, with the embeddings already built; time
is the wall time of the call (``--threads`` faiss/OpenMP threads). The scores of ``ours`` and
``pytrec`` are printed side by side: they agree (random data has no score ties).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_data(n_queries: int, n_docs: int, dim: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n_docs, dim), dtype=np.float32)
    qrels = [rng.choice(n_docs, size=rng.integers(1, 4), replace=False).tolist() for _ in range(n_queries)]
    queries = np.stack([docs[rel].mean(axis=0) for rel in qrels])
    queries += 1.5 * rng.standard_normal(queries.shape, dtype=np.float32)
    return queries, docs, qrels


def run_one(kind: str, n_queries: int, n_docs: int, dim: int, ks: list[int], threads: int, seed: int) -> dict:
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(threads)
    queries, docs, qrels = make_data(n_queries, n_docs, dim, seed)
    k = min(max(ks), n_docs)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out: dict = {}
    if kind in ("bare", "pytrec"):
        q, d = queries.copy(), docs.copy()
        faiss.normalize_L2(q)
        faiss.normalize_L2(d)
        index = faiss.IndexFlatIP(dim)
        index.add(d)
        scores, ids = index.search(q, k)
        if kind == "pytrec":
            import pytrec_eval

            judged = {f"q{i}": {f"d{j}": 1 for j in rel} for i, rel in enumerate(qrels)}
            run = {f"q{i}": {f"d{j}": float(s) for j, s in zip(ids[i].tolist(), scores[i].tolist())} for i in range(len(q))}
            run10 = {f"q{i}": {f"d{j}": float(s) for j, s in zip(ids[i, :10].tolist(), scores[i, :10].tolist())} for i in range(len(q))}
            full = pytrec_eval.RelevanceEvaluator(judged, {"ndcg_cut.10", "recall." + ",".join(map(str, ks)), "success.1"}).evaluate(run)
            cut = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(run10)
            out = {"mrr@10": float(np.mean([v["recip_rank"] for v in cut.values()])),
                   "ndcg@10": float(np.mean([v["ndcg_cut_10"] for v in full.values()]))}
            out |= {f"recall@{kk}": float(np.mean([v[f"recall_{kk}"] for v in full.values()])) for kk in ks}
            out["r@1"] = float(np.mean([v["success_1"] for v in full.values()]))
    else:
        from lightning_modules.metrics.ranking import ranking_metrics

        out = ranking_metrics(queries, docs, qrels, ks=tuple(ks))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "seconds": seconds, "extra_mib": (peak - base) / 1024, "scores": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=6980)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["bare", "pytrec", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        if args.child == "ours":  # import outside the measured window
            import lightning_modules.metrics.ranking  # noqa: F401
        elif args.child == "pytrec":
            import pytrec_eval  # noqa: F401
        print(json.dumps(run_one(args.child, args.queries, args.docs, args.dim, args.ks, args.threads, args.seed)))
        return
    results = {}
    for kind in ("bare", "pytrec", "ours"):
        cmd = [sys.executable, __file__, "--child", kind, "--queries", str(args.queries), "--docs", str(args.docs),
               "--dim", str(args.dim), "--threads", str(args.threads), "--seed", str(args.seed), "--ks", *map(str, args.ks)]
        results[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print(f"Q={args.queries} N={args.docs} D={args.dim} ks={args.ks} threads={args.threads}")
    print(f"{'':<8}{'seconds':>10}{'extra MiB':>12}")
    for kind, r in results.items():
        print(f"{kind:<8}{r['seconds']:>10.2f}{r['extra_mib']:>12.0f}")
    print(f"ratio ours/bare: {results['ours']['seconds'] / results['bare']['seconds']:.2f}x   "
          f"ours/pytrec: {results['ours']['seconds'] / results['pytrec']['seconds']:.2f}x")
    for key, value in results["ours"]["scores"].items():
        print(f"  {key:<12} ours {value:.6f}   pytrec_eval {results['pytrec']['scores'][key]:.6f}")


if __name__ == "__main__":
    main()
