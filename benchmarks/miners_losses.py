"""Speed of every miner + loss pair (forward and backward) against pytorch-metric-learning and the matmul floor.

    python benchmarks/miners_losses.py                      # B = 128 512 2048, D = 128 512
    python benchmarks/miners_losses.py --batch 2048 --dim 512 --pairs batch_hard multi_similarity

For each pair the script times one training step's mining and loss work, as a LightningModule runs
it: ``mined = miner(x, labels); loss(x, labels, mined).backward()`` on a leaf ``x: [B, D]``. The
same step with pytorch-metric-learning's miner and loss is the reference. The floor is the bare
``B x B`` similarity matmul, forward and backward (``(x @ x.T).sum().backward()``): any in-batch
loss computes that matrix and back-propagates through it, and a loss step cannot be cheaper. The
forward-only matmul is printed too. Timings are the median of ``--repeats`` runs after one warm-up,
on CPU with ``torch.set_num_threads(--threads)`` (2 by default).

Batches are class-balanced (``--per-class`` samples of each class, P x K sampling) with random
Gaussian embeddings (``--embeddings random``) or tight class clusters (``clustered``), which changes
how many tuples the miners return. Our losses are looked up by name in ``losses`` (another engineer
writes them), so a pair whose loss does not exist yet is listed as skipped. PML's ``NTXentLoss`` is
``O(B^3)`` in memory and is skipped above ``B = 256``. ``HardNegativeTopKMiner`` has no PML
counterpart: its PML column runs PML's loss on our miner's tuples. Pairs without a miner
(``supcon``, ``ntxent``) time the loss over every tuple of the batch. ``value`` is the relative
difference of the two loss values (both libraries on the same batch; blank for random miners).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import losses  # noqa: E402
import miners  # noqa: E402


@dataclass
class Pair:
    """One row of the table: a miner and a loss, ours and PML's, by class name and arguments."""

    name: str
    miner: Optional[tuple[str, dict[str, Any]]]  # None: no miner (every tuple), on both sides
    loss: tuple[str, dict[str, Any]]
    pml_miner: Optional[tuple[str, dict[str, Any]]]
    pml_loss: tuple[str, dict[str, Any]]
    random: bool = False
    pml_max_batch: Optional[int] = None
    notes: list[str] = field(default_factory=list)


SEMIHARD = {"margin": 0.2, "type_of_triplets": "semihard"}
PAIRS = [
    Pair("batch_hard", ("BatchHardMiner", {}), ("TripletMarginLoss", {"margin": 0.05}),
         ("BatchHardMiner", {}), ("TripletMarginLoss", {"margin": 0.05})),
    Pair("multi_similarity", ("MultiSimilarityMiner", {"epsilon": 0.1}), ("MultiSimilarityLoss", {}),
         ("MultiSimilarityMiner", {"epsilon": 0.1}), ("MultiSimilarityLoss", {})),
    Pair("semihard_triplet", ("TripletMarginMiner", SEMIHARD), ("TripletMarginLoss", {"margin": 0.2}),
         ("TripletMarginMiner", SEMIHARD), ("TripletMarginLoss", {"margin": 0.2})),
    Pair("easy_positive", ("BatchEasyHardMiner", {}), ("TripletMarginLoss", {"margin": 0.2}),
         ("BatchEasyHardMiner", {}), ("TripletMarginLoss", {"margin": 0.2})),
    Pair("pair_margin_contrastive", ("PairMarginMiner", {}), ("ContrastiveLoss", {}),
         ("PairMarginMiner", {}), ("ContrastiveLoss", {})),
    Pair("distance_weighted_margin", ("DistanceWeightedMiner", {}), ("MarginLoss", {}),
         ("DistanceWeightedMiner", {}), ("MarginLoss", {}), random=True),
    Pair("topk_triplet", ("HardNegativeTopKMiner", {"k": 10}), ("TripletMarginLoss", {"margin": 0.05}),
         None, ("TripletMarginLoss", {"margin": 0.05})),
    Pair("topk_ntxent", ("HardNegativeTopKMiner", {"k": 10}), ("NTXentLoss", {}),
         None, ("NTXentLoss", {}), pml_max_batch=256),
    Pair("supcon", None, ("SupConLoss", {}), None, ("SupConLoss", {})),
    Pair("ntxent", None, ("NTXentLoss", {}), None, ("NTXentLoss", {}), pml_max_batch=256),
]


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, min_seconds: float = 1.0) -> dict[str, float]:
    """Median milliseconds of each function, timed in rounds (one call of each per round).

    Interleaving keeps the ratios between the functions meaningful when other processes load the
    machine unevenly over time. Each function runs once untimed first (warm-up); there are at
    least ``repeats`` rounds, and more (up to 50) while the rounds so far took under ``min_seconds``
    in total, so that fast cases are not decided by a few noisy samples.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or (rounds < 50 and time.perf_counter() - started < min_seconds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def make_batch(b: int, d: int, per_class: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    classes = max(2, b // per_class)
    labels = torch.arange(b) % classes
    labels = labels[torch.randperm(b, generator=g)]
    emb = torch.randn(b, d, generator=g)
    if kind == "clustered":
        centers = torch.randn(classes, d, generator=g)
        emb = centers[labels] + 0.5 * emb
    return emb, labels


def step(miner, loss, emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    x = emb.clone().requires_grad_(True)
    mined = miner(x, labels) if miner is not None else None
    value = loss(x, labels, mined)
    value.backward()
    return float(value.detach()), count_tuples(mined)


def count_tuples(mined: Any) -> int:
    if mined is None:
        return 0
    if isinstance(mined, miners.Mined):
        return len(mined)
    if len(mined) == 3:
        return len(mined[0])
    return len(mined[0]) + len(mined[2])


def build(module: Any, spec: Optional[tuple[str, dict[str, Any]]]) -> Any:
    if spec is None:
        return None
    cls = getattr(module, spec[0], None)
    if cls is None:
        raise LookupError(f"{module.__name__}.{spec[0]} does not exist yet")
    return cls(**spec[1])


def floor_fns(emb: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The matmul forward, and forward + backward (the floor)."""

    def forward() -> None:
        with torch.no_grad():
            emb @ emb.t()

    def forward_backward() -> None:
        x = emb.clone().requires_grad_(True)
        (x @ x.t()).sum().backward()

    return {"mm_fwd": forward, "floor": forward_backward}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    try:
        import pytorch_metric_learning.losses as pml_losses
        import pytorch_metric_learning.miners as pml_miners
    except ImportError:
        pml_losses = pml_miners = None
    chosen = [p for p in PAIRS if not args.pairs or p.name in args.pairs]
    rows = []
    for d in args.dim:
        for b in args.batch:
            emb, labels = make_batch(b, d, args.per_class, args.embeddings)
            for pair in chosen:
                row: dict[str, Any] = {"pair": pair.name, "B": b, "D": d, "notes": []}
                rows.append(row)
                time_pair(pair, row, emb, labels, args, pml_losses, pml_miners)
                print(format_row(row), flush=True)
    return rows


def time_pair(pair: Pair, row: dict[str, Any], emb, labels, args, pml_losses, pml_miners) -> None:
    """Fill ``row`` with the floor, our time, PML's time and the value check (or notes saying why not)."""
    b = len(emb)
    fns = floor_fns(emb)
    try:
        miner, loss = build(miners, pair.miner), build(losses, pair.loss)
    except LookupError as err:
        row["notes"].append(f"skipped: {err}")
        miner = loss = None
    if loss is not None:
        torch.manual_seed(0)
        ours_value, row["tuples"] = step(miner, loss, emb, labels)
        fns["ours"] = lambda: step(miner, loss, emb, labels)
    pml_step = None
    if loss is None:
        pass
    elif pml_losses is None or args.no_pml:
        row["notes"].append("PML not run")
    elif pair.pml_max_batch is not None and b > pair.pml_max_batch:
        row["notes"].append(f"PML {pair.pml_loss[0]} skipped above B={pair.pml_max_batch} (O(B^3) memory)")
    else:
        pml_loss = build(pml_losses, pair.pml_loss)
        if pair.miner is None:
            pml_miner_fn = None
        elif pair.pml_miner is None:
            def pml_miner_fn(x, y):  # no PML counterpart: PML's loss on our miner's tuples
                return miner(x, y).to_tuple()

            row["notes"].append("PML column: our miner + PML loss")
        else:
            pml_miner_fn = build(pml_miners, pair.pml_miner)
        torch.manual_seed(0)
        pml_value, _ = step(pml_miner_fn, pml_loss, emb, labels)
        fns["pml"] = pml_step = lambda: step(pml_miner_fn, pml_loss, emb, labels)
        if not pair.random:
            row["value"] = abs(ours_value - pml_value) / max(abs(pml_value), 1e-12)
    row.update(interleaved_medians(fns, args.repeats))
    del pml_step


HEADER = (
    f"{'pair':<26}{'B':>6}{'D':>5}{'tuples':>10}{'ours ms':>10}{'PML ms':>10}{'mm ms':>8}{'mm f+b':>8}"
    f"{'ours/mm':>9}{'PML/ours':>9}{'value':>9}  notes"
)


def format_row(row: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "-"

    ratio = f"{row['ours'] / row['floor']:.2f}" if "ours" in row else "-"
    speedup = f"{row['pml'] / row['ours']:.1f}" if "ours" in row and "pml" in row else "-"
    value = f"{row['value']:.0e}" if "value" in row else ""
    return (
        f"{row['pair']:<26}{row['B']:>6}{row['D']:>5}{num('tuples', 'd'):>10}{num('ours', '.1f'):>10}"
        f"{num('pml', '.1f'):>10}{row['mm_fwd']:>8.1f}{row['floor']:>8.1f}{ratio:>9}{speedup:>9}{value:>9}  "
        + "; ".join(row["notes"])
    )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--dim", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--pairs", nargs="*", default=None, help=f"subset of: {' '.join(p.name for p in PAIRS)}")
    parser.add_argument("--per-class", type=int, default=4, help="samples per class (P x K batches)")
    parser.add_argument("--embeddings", choices=["random", "clustered"], default="random")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-pml", action="store_true", help="time only our pairs")
    args = parser.parse_args(argv)
    unknown = set(args.pairs or ()) - {p.name for p in PAIRS}
    if unknown:
        parser.error(f"unknown pairs {sorted(unknown)}; expected some of {[p.name for p in PAIRS]}")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"threads={args.threads} repeats={args.repeats} per_class={args.per_class} embeddings={args.embeddings} "
        f"cpus={os.cpu_count()} load average={load} (other processes distort timings)"
    )
    print("mm ms: B x B matmul forward; mm f+b: forward + backward (the floor); ours/mm = ours / mm f+b")
    print(HEADER, flush=True)
    rows = run(args)
    print("\nsummary")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
