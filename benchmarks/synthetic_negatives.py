"""Synthetic-negative mini-benchmark: Metrix and MoCHi against their baselines on Fashion-MNIST.

Every arm is ``hardneg fit`` on ``benchmarks/configs/synthetic_negatives_base.yaml`` (a fixed small
budget: Lite0 + 128-d head at 32 px, 50 steps of 5 x 4 batches) plus the arm's config fragments, run
for each seed in its own process; the script then reads each run's final validation metrics
(``val/recall@1``, ``val/map@r`` on a fixed 1,000-image subset of the unseen test classes) and
prints a Markdown table of mean +/- sample std over seeds, with the mean wall time of a run, and a
second table of each method minus its baseline on the same seed (paired differences).

Arms: the contrastive and multi-similarity losses alone and with Metrix in each of its three places
(input, feature, embedding); supervised InfoNCE against a 1,024-entry memory queue without
(MoCHi with s = s' = 0) and with MoCHi; and the untrained encoder (0 steps) for scale.

    python benchmarks/synthetic_negatives.py                       # every arm x 5 seeds
    python benchmarks/synthetic_negatives.py --arms contrastive --seeds 0 1 --out runs/bench_try

Finished runs (a ``metrics.csv`` with the final validation row) are reused, so an interrupted
benchmark resumes. Runs use one CPU thread each (``OMP_NUM_THREADS=1``): on a shared 2-core machine
PyTorch's default of two threads was ~10x slower per step in our measurements.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "benchmarks/configs/synthetic_negatives_base.yaml"
MOCHI_OFF = [
    "model.init_args.loss.init_args.miner.init_args.mochi.init_args.s=0",
    "model.init_args.loss.init_args.miner.init_args.mochi.init_args.s_prime=0",
]
# arm name -> entries after the base (config fragments or key=value overrides; the last one wins);
# "validate" evaluates without training
ARMS: dict[str, list[str]] = {
    "untrained (ImageNet Lite0, random head)": ["validate"],
    "contrastive": [],
    "contrastive + Metrix/input": ["experiments/mixing/metrix_input.yaml"],
    "contrastive + Metrix/feature": ["experiments/mixing/metrix_feature.yaml"],
    "contrastive + Metrix/embedding": ["experiments/mixing/metrix_embedding.yaml"],
    "multi-similarity": ["experiments/loss/multi_similarity.yaml"],
    "multi-similarity + Metrix/input": ["experiments/mixing/metrix_input.yaml", "experiments/loss/multi_similarity.yaml"],
    "multi-similarity + Metrix/feature": ["experiments/mixing/metrix_feature.yaml", "experiments/loss/multi_similarity.yaml"],
    "multi-similarity + Metrix/embedding": ["experiments/mixing/metrix_embedding.yaml", "experiments/loss/multi_similarity.yaml"],
    "InfoNCE + queue": ["experiments/mixing/mochi.yaml", *MOCHI_OFF],
    "InfoNCE + queue + MoCHi": ["experiments/mixing/mochi.yaml"],
}
METRICS = ("val/recall@1", "val/map@r")
# the arm each method is compared with, seed by seed (same seed: same head initialisation; all runs share one batch schedule)
BASELINE_OF = {
    **{f"contrastive + Metrix/{m}": "contrastive" for m in ("input", "feature", "embedding")},
    **{f"multi-similarity + Metrix/{m}": "multi-similarity" for m in ("input", "feature", "embedding")},
    "InfoNCE + queue + MoCHi": "InfoNCE + queue",
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def argv_for(entries: list[str], seed: int, folder: Path) -> list[str]:
    command = "validate" if "validate" in entries else "fit"
    argv = [command, "--config", BASE]
    for e in entries:
        if e != "validate":
            argv += ["--config", e] if e.endswith(".yaml") else [f"--{e}"]
    # the seed sets the head's initialisation, the crops and the mixing; the batch schedule and the
    # evaluation subset (data.init_args.seed) stay fixed so that every arm and seed is scored on the same images
    return argv + [f"--seed_everything={seed}", f"--trainer.default_root_dir={folder}"]


def final_metrics(folder: Path) -> dict[str, float] | None:
    """The last validation row of the run: ``metrics.csv`` of a fit, or of the newest ``validate-*/`` log."""
    candidates = [folder / "metrics.csv", *sorted(folder.glob("validate-*/metrics.csv"), reverse=True)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    rows = [r for r in csv.DictReader(path.open()) if r.get(METRICS[0])]
    return {k: float(rows[-1][k]) for k in METRICS} if rows else None


def run(name: str, seed: int, out: Path) -> dict[str, float]:
    folder = out / slug(name) / f"seed-{seed}"
    done = final_metrics(folder)
    timing = folder / "seconds.txt"
    if done is not None and timing.is_file():
        return {**done, "seconds": float(timing.read_text())}
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [*folder.glob("metrics.csv"), *folder.glob("validate-*/metrics.csv")]:
        stale.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "experiments.cli", *argv_for(ARMS[name], seed, folder)]
    start = time.time()
    with (folder / "stdout.log").open("w") as log:
        status = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    done = final_metrics(folder)
    if status != 0 or done is None:
        raise RuntimeError(f"{name} seed {seed} failed (exit {status}); see {folder / 'stdout.log'}")
    timing.write_text(f"{seconds:.1f}")
    return {**done, "seconds": seconds}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    def cell(values: list[float]) -> str:
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * std:.1f}"

    lines = ["| arm | R@1 (%) | MAP@R (%) | seeds | s / run |", "|---|---|---|---|---|"]
    for name, runs in results.items():
        r1 = cell([r["val/recall@1"] for r in runs])
        mapr = cell([r["val/map@r"] for r in runs])
        secs = statistics.fmean(r["seconds"] for r in runs)
        lines.append(f"| {name} | {r1} | {mapr} | {len(runs)} | {secs:.0f} |")
    return "\n".join(lines)


def paired_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Each method minus its baseline on the same seed: mean +/- std of the differences, and how often it is better."""
    lines = ["| arm | vs | ΔR@1 (points) | ΔMAP@R (points) | better R@1 / MAP@R |", "|---|---|---|---|---|"]
    for name, base in BASELINE_OF.items():
        if name not in results or base not in results:
            continue
        cells = []
        wins = []
        for key in METRICS:
            d = [100 * (r[key] - b[key]) for r, b in zip(results[name], results[base])]
            std = statistics.stdev(d) if len(d) > 1 else 0.0
            cells.append(f"{statistics.fmean(d):+.1f} ± {std:.1f}")
            wins.append(f"{sum(v > 0 for v in d)}/{len(d)}")
        lines.append(f"| {name} | {base} | {cells[0]} | {cells[1]} | {' / '.join(wins)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), help="arm names or slugs (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "synthetic_negatives")
    parser.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args(argv)
    by_slug = {slug(a): a for a in ARMS}
    arms = [by_slug.get(slug(a), a) for a in args.arms]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    results: dict[str, list[dict[str, float]]] = {}
    for name in arms:
        for seed in args.seeds:
            r = run(name, seed, args.out.resolve())
            results.setdefault(name, []).append(r)
            print(f"{name:40s} seed {seed}: R@1 {r['val/recall@1']:.4f}  MAP@R {r['val/map@r']:.4f}  ({r['seconds']:.0f} s)", flush=True)
    text = table(results) + "\n\n" + paired_table(results)
    print(text)
    if args.table is not None:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
