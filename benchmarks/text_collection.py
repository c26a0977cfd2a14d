"""Index time and memory of ``LazyTextCollection`` on a generated MS MARCO-sized file.

    python benchmarks/text_collection.py [--passages 1000000] [--words 60] [--reads 10000] [--path /tmp/...]

Writes a ``pid<TAB>passage`` file of ``--passages`` lines of about ``--words`` random words (the
shape of MS MARCO's ``collection.tsv``; 1M passages is about 1/9 of it), then, each in a fresh
subprocess so that nothing is shared with this one:

1. build: no cache; open the collection (one indexing pass, cache written) and read ``--reads``
   random passages;
2. reopen: the same with the cache in place.

Memory is the peak RSS of the child (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) minus its RSS
after the imports (``/proc/self/statm``): what the collection costs above the interpreter and the
imported libraries. The target is < 200 MB for 1M passages. ``docs/msmarco.md`` has the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from datamodules.text_collection import LazyTextCollection

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

base = rss_mb()
start = time.perf_counter()
c = LazyTextCollection({path!r})
opened = time.perf_counter() - start
rows = np.random.default_rng(0).integers(0, len(c), size={reads})
start = time.perf_counter()
chars = sum(len(c[int(r)]) for r in rows)
read = time.perf_counter() - start
assert c.row_of(c.ids[rows]).tolist() == rows.tolist()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"open_s": opened, "read_s": read, "reads": len(rows), "chars": chars, "rss_after_imports_mb": base,
                  "peak_rss_mb": peak, "above_interpreter_mb": peak - base, "rows": len(c), "source": c.index_source}}))
"""


def generate(path: Path, passages: int, words: int, seed: int = 0) -> None:
    """``pid<TAB>passage`` lines of ``words`` +/- 50% random words from a 5,000-word vocabulary."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(5000)]
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, passages, 10_000):
            n = min(10_000, passages - start)
            lengths = rng.integers(words // 2, words * 3 // 2 + 1, size=n)
            ids = rng.integers(0, len(vocab), size=int(lengths.sum()))
            pos = 0
            lines = []
            for i, length in enumerate(lengths):
                lines.append(f"{start + i}\t{' '.join(vocab[j] for j in ids[pos:pos + length])}.\n")
                pos += length
            f.write("".join(lines))


def run_child(path: Path, reads: int) -> dict:
    code = CHILD.format(root=str(ROOT), path=str(path), reads=reads)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--reads", type=int, default=10_000)
    parser.add_argument("--path", default="/tmp/hardneg-bench-collection.tsv")
    parser.add_argument("--keep", action="store_true", help="keep the generated file and its index")
    args = parser.parse_args()
    path = Path(args.path)
    cache = path.with_name(path.name + ".hardneg-index.npz")
    start = time.perf_counter()
    generate(path, args.passages, args.words)
    size = path.stat().st_size
    print(f"generated {args.passages:,} passages ({size / 2**20:,.0f} MB) in {time.perf_counter() - start:.1f} s: {path}")
    cache.unlink(missing_ok=True)
    print(f"{'run':<8}{'open s':>9}{'MB/s':>8}{'reads/s':>10}{'RSS after imports MB':>22}{'peak MB':>9}{'above MB':>10}  index")
    for run in ("build", "reopen"):
        r = run_child(path, args.reads)
        rate = size / 2**20 / r["open_s"] if run == "build" else float("nan")
        print(f"{run:<8}{r['open_s']:>9.2f}{rate:>8.0f}{r['reads'] / r['read_s']:>10.0f}{r['rss_after_imports_mb']:>22.0f}"
              f"{r['peak_rss_mb']:>9.0f}{r['above_interpreter_mb']:>10.0f}  {r['source']}", flush=True)
    print(f"index file: {cache.stat().st_size / 2**20:.1f} MB for {r['rows']:,} rows; cpus: {os.cpu_count()}")
    if not args.keep:
        path.unlink()
        cache.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
