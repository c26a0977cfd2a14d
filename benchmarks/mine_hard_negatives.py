"""``miners.mine_hard_negatives`` against sentence-transformers' ``util.mine_hard_negatives`` on WordNet glosses with MiniLM.

    python benchmarks/mine_hard_negatives.py                          # every train query, the whole corpus
    python benchmarks/mine_hard_negatives.py --queries 5000 --docs 20000

Data: ``WordNetGlossDataModule`` (definition -> lemma list; 76,003 distinct documents, 65,691 train
queries). sentence-transformers merges equal texts, so only the first train query of each distinct
definition is used (65,233). A subset keeps ``--queries`` of them (seeded) and a corpus of ``--docs``
documents: their positives plus random others. Model: the packaged all-MiniLM-L6-v2 (``minilm-l6``
preset for us, ``SentenceTransformer`` for them), CPU, batch size ``--batch-size``.

Rows (each a wall time; same process, same torch threads):

- ``st total``: their function on the (anchor, positive) dataset and the corpus: encoding and mining
  (``use_faiss=True``, ``output_format="labeled-list"``, ``cache_folder`` set so it saves its embeddings).
- ``st mining``: the same call again, reading its cached embeddings: its search, filters and dataset building.
- ``ours encode``: ``HFTextEncoder.encode`` of the corpus and the queries.
- ``ours mining``: ``mine_hard_negatives`` on those embeddings (flat faiss index, chunked search, filters).
- ``full-size mining``: ours on random vectors of the full benchmark's shapes (the search cost does not
  depend on the content), against the encoding time of the full benchmark extrapolated from the
  measured encoding throughput. Only printed for a subset run.

Equality: the rows (queries) whose negatives are identical, id for id, between theirs and ours on
their cached embeddings (the same vectors) and on our own embeddings (the same model through
``HFTextEncoder``: equal up to float rounding, so a near-tie may flip).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load(n_queries: int | None, n_docs: int | None, seed: int):
    """``(queries, corpus, positives, full sizes)``: distinct definitions, documents, and positives as corpus rows."""
    from datamodules.wordnet import WordNetGlossDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = WordNetGlossDataModule(num_workers=0)
        dm.prepare_splits()
    train, corpus = dm.data.train, dm.data.corpus
    first: dict[str, int] = {}
    for row in range(len(train.queries)):
        first.setdefault(train.queries[row], row)
    rows = sorted(first.values())
    full = (len(rows), len(corpus))
    rng = random.Random(seed)
    if n_queries is not None and n_queries < len(rows):
        rows = sorted(rng.sample(rows, n_queries))
    positives = [list(train.qrels[r]) for r in rows]
    if n_docs is None or n_docs >= len(corpus):
        docs = list(range(len(corpus)))
    else:
        needed = sorted({d for p in positives for d in p})
        if n_docs < len(needed):
            raise SystemExit(f"--docs {n_docs} is fewer than the {len(needed)} positives of the chosen queries")
        others = sorted(set(range(len(corpus))) - set(needed))
        docs = sorted(needed + rng.sample(others, n_docs - len(needed)))
    new_row = {d: i for i, d in enumerate(docs)}
    return [train.queries[r] for r in rows], [corpus[d] for d in docs], [[new_row[d] for d in p] for p in positives], full


def st_negatives(out, queries: list[str], corpus: list[str]) -> list[list[int]]:
    """Their labeled-list dataset -> per query its negatives as corpus rows (empty when none)."""
    q_row, d_row = {q: i for i, q in enumerate(queries)}, {d: i for i, d in enumerate(corpus)}
    mined = [[] for _ in queries]
    for anchor, docs in zip(out["anchor"], out["positive"]):
        mined[q_row[anchor]] = [d_row[t] for t in docs[1:]]
    return mined


def rows_equal(ids, theirs: list[list[int]]) -> int:
    return sum([int(i) for i in row if i >= 0] == t for row, t in zip(ids.tolist(), theirs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=None, help="train queries to mine (default: all distinct ones)")
    p.add_argument("--docs", type=int, default=None, help="corpus documents (default: all)")
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--relative-margin", type=float, default=0.05, help="NV-Retriever's TopK-PercPos 95%%; a negative value turns it off")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import numpy as np
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    from miners import mine_hard_negatives
    from models import create_encoder, minilm_l6_path

    queries, corpus, positives, (full_q, full_n) = load(args.queries, args.docs, args.seed)
    subset = len(queries) < full_q or len(corpus) < full_n
    margin = args.relative_margin if args.relative_margin >= 0 else None
    print(f"WordNet glosses: {len(queries):,} queries x {len(corpus):,} documents{' (subset)' if subset else ''}; "
          f"num_negatives={args.num_negatives}, relative_margin={margin}, torch threads {torch.get_num_threads()}", flush=True)
    dataset = Dataset.from_dict({"anchor": [q for q, pos in zip(queries, positives) for _ in pos],
                                 "positive": [corpus[d] for pos in positives for d in pos]})
    settings = {"num_negatives": args.num_negatives, "relative_margin": margin}
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        model = SentenceTransformer(minilm_l6_path(), device="cpu")
        st_kwargs = {"corpus": corpus, "use_faiss": True, "output_format": "labeled-list", "cache_folder": cache, "batch_size": args.batch_size,
                     "verbose": False, **settings}
        t = time.perf_counter()
        st_out = st_mine(dataset, model, **st_kwargs)
        times["st total"] = time.perf_counter() - t
        t = time.perf_counter()
        st_out = st_mine(dataset, model, **st_kwargs)
        times["st mining"] = time.perf_counter() - t
        theirs = st_negatives(st_out, queries, corpus)
        st_q = np.load(next(Path(cache).glob("query_embeddings_*.npy")))
        st_c = np.load(next(Path(cache).glob("corpus_embeddings_*.npy")))
    del model

    encoder = create_encoder("minilm-l6")
    t = time.perf_counter()
    corpus_emb = encoder.encode(corpus, batch_size=args.batch_size)
    query_emb = encoder.encode(queries, batch_size=args.batch_size)
    times["ours encode"] = time.perf_counter() - t
    t = time.perf_counter()
    ids = mine_hard_negatives(query_emb, corpus_emb, positives, **settings)
    times["ours mining"] = time.perf_counter() - t
    same_vectors = rows_equal(mine_hard_negatives(st_q, st_c, positives, **settings), theirs)
    own_vectors = rows_equal(ids, theirs)
    short = int((ids < 0).any(1).sum())

    rows = [
        ("sentence-transformers total (encode + mine)", times["st total"], ""),
        ("sentence-transformers mining (cached embeddings)", times["st mining"], ""),
        ("ours: encode (HFTextEncoder)", times["ours encode"], f"{(len(queries) + len(corpus)) / times['ours encode']:,.0f} texts/s"),
        ("ours: search + filtering", times["ours mining"], f"{100 * times['ours mining'] / times['ours encode']:.1f}% of encoding"),
        ("ours total", times["ours encode"] + times["ours mining"], f"{times['st total'] / (times['ours encode'] + times['ours mining']):.2f}x faster than st"),
    ]
    if subset:
        rng = np.random.default_rng(args.seed)
        fq, fc = rng.standard_normal((full_q, 384), dtype=np.float32), rng.standard_normal((full_n, 384), dtype=np.float32)
        fpos = [[int(i)] for i in rng.integers(0, full_n, full_q)]
        t = time.perf_counter()
        mine_hard_negatives(fq, fc, fpos, **settings)
        full_mine = time.perf_counter() - t
        full_encode = (full_q + full_n) * times["ours encode"] / (len(queries) + len(corpus))
        rows.append((f"ours: search + filtering, full size {full_q:,} x {full_n:,} (random vectors)", full_mine,
                     f"{100 * full_mine / full_encode:.1f}% of the full encoding (~{full_encode:,.0f} s extrapolated)"))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'step':<{width}}  {'seconds':>9}  note")
    for name, sec, note in rows:
        print(f"{name:<{width}}  {sec:>9.2f}  {note}")
    print(f"\nidentical negatives, theirs vs ours on their embeddings: {same_vectors:,} / {len(queries):,} queries")
    print(f"identical negatives, theirs vs ours on our embeddings:   {own_vectors:,} / {len(queries):,} queries")
    print(f"queries with fewer than {args.num_negatives} negatives (ours): {short:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
