"""Time and peak memory of ``retrieval_metrics`` against a bare faiss search with the same k.

    python benchmarks/retrieval_metrics.py                    # SOP test size: 60,502 rows, 11,316 classes, D = 512
    python benchmarks/retrieval_metrics.py --n 120000 --dim 128 --ks 1 10 100 1000

The SOP protocol (Recall@1/10/100/1000, R-Precision, MAP@R, a set retrieving from itself) on
synthetic clustered embeddings with SOP's class sizes (2 to 12 images per class). ``bare`` is the
search any implementation needs: one ``faiss.IndexFlatIP`` over the L2-normalised rows and one
``search`` of every row with the k our search uses (``max(max(ks), max R) + 1`` for the row itself).
``ours`` is ``lightning_modules.metrics.retrieval_metrics`` (checks, normalisation, chunked search on
the shared index helper, scoring). Each runs in a fresh subprocess: memory is the peak resident set
size during the call (``resource.getrusage`` max RSS) minus the resident size just before it, with
the embeddings already built; time is the wall time of the call (``--threads`` faiss/OpenMP
threads). Target (issue 11): ours <= 1.2x bare, <= 2 GiB extra peak memory whatever N.
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


def make_data(n: int, dim: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 13, size=n)  # SOP: 2..12 images per class
    labels = np.repeat(np.arange(n), sizes)[:n]
    centers = rng.standard_normal((labels[-1] + 1, dim), dtype=np.float32)
    emb = centers[labels]
    emb += 2.0 * rng.standard_normal((n, dim), dtype=np.float32)
    del centers
    return emb, labels


def run_one(kind: str, n: int, dim: int, ks: list[int], threads: int, seed: int) -> dict:
    import faiss
    import numpy as np

    faiss.omp_set_num_threads(threads)
    emb, labels = make_data(n, dim, seed)
    counts = np.bincount(labels)
    k = min(max(max(ks), int(counts.max()) - 1), n - 1) + 1
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if kind == "bare":
        x = emb.copy()
        faiss.normalize_L2(x)
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        index.search(x, k)
        out = {}
    else:
        sys.path.insert(0, str(ROOT))
        from lightning_modules.metrics import retrieval_metrics

        out = retrieval_metrics(emb, labels, ks=tuple(ks))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "seconds": seconds, "extra_mib": (peak - base) / 1024, "k": k, "scores": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["bare", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "ours":  # import outside the measured window, as the bare child imports faiss
            sys.path.insert(0, str(ROOT))
            import lightning_modules.metrics.retrieval  # noqa: F401
        print(json.dumps(run_one(args.child, args.n, args.dim, args.ks, args.threads, args.seed)))
        return
    results = {}
    for kind in ("bare", "ours"):
        cmd = [sys.executable, __file__, "--child", kind, "--n", str(args.n), "--dim", str(args.dim),
               "--threads", str(args.threads), "--seed", str(args.seed), "--ks", *map(str, args.ks)]
        results[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    bare, ours = results["bare"], results["ours"]
    print(f"N={args.n} D={args.dim} ks={args.ks} k={bare['k']} threads={args.threads}")
    print(f"{'':<6}{'seconds':>10}{'extra MiB':>12}")
    for kind, r in results.items():
        print(f"{kind:<6}{r['seconds']:>10.2f}{r['extra_mib']:>12.0f}")
    print(f"ratio ours/bare: {ours['seconds'] / bare['seconds']:.2f}x   (target <= 1.2x, <= 2048 MiB extra)")
    print("scores:", {key: round(v, 4) for key, v in ours["scores"].items()})


if __name__ == "__main__":
    main()
