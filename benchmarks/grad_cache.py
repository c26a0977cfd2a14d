"""Peak memory and time of a GradCache step against uncached steps.

    python benchmarks/grad_cache.py                                  # resnet18 at 32 px, B = 4096, chunks of 256
    python benchmarks/grad_cache.py --encoder mlp --batch 2048 --chunk 128 --objective triplet

Three configurations, each in a fresh subprocess so that its peak resident memory is its own:

- ``cached``: one ``GradCache(--chunk)`` step over ``--batch`` rows;
- ``uncached-chunk``: one ordinary step over ``--chunk`` rows (what fits in memory without caching);
- ``uncached-batch``: one ordinary step over ``--batch`` rows (what caching replaces).

A step is forward, objective, backward (the optimizer is left out: it is the same in all three).
Memory is the peak resident set size during the steps (``resource.getrusage`` max RSS) minus the
resident size just before the first step, after the encoder and the input batch were built:
torch's CPU allocations are invisible to ``tracemalloc``. Memory is measured over one step in a
child run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so that every freed tensor above 64 KiB goes
back to the system at once (with glibc's default dynamic threshold, memory freed between the two
passes stays resident and the RSS peak adds phases that never coexist). That setting slows
allocation, so time is measured in a second child with the default allocator: the median of
``--repeats`` steps after one warm-up step, with ``torch.set_num_threads(--threads)`` (1 by default: on the shared 2-core machine
two threads were contended and measured a cached/uncached ratio of 7 that one thread measured as 1.4).

The encoder is a real one: timm's ``resnet18`` (random weights, ``num_classes=0`` so that it returns
its 512-d pooled features; BatchNorm in train mode) on ``--image-size`` px images, or an MLP
(``--encoder mlp``, 3 x 2048 hidden, GELU, LayerNorm). The objective is ``NTXentLoss`` with P x K labels
(4 rows per class), or ``TripletMarginLoss`` with ``BatchHardMiner``. Both hold ``[B, B]`` matrices:
that memory belongs to the objective, which GradCache does not shrink (Gao et al. 2021 assume the
representation-level loss is cheap); the ``objective-only`` row measures it on detached
embeddings so the two shares can be read apart.

Measured here (B = 4096, chunks of 256, NT-Xent, resnet18, 1 thread; step memory, ratio to the
uncached 256-row step):

- 64 px: cached 547 MB = 1.13x the uncached 256 step (485 MB) and 0.08x the uncached 4096 step
  (7,174 MB); cached step time 0.61x the uncached 4096 step (which pages heavily);
- 32 px: cached 304 MB = 1.82x the uncached 256 step (167 MB): at this size the objective's own
  ``[B, B]`` matrices (276 MB, the ``objective-only`` row) outweigh one chunk's encoder activations.

So the <= 1.2x target of issue 11 holds once the encoder dominates a chunk's memory (any realistic
image or text encoder), and the remaining cost is the loss at the full batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = ("cached", "uncached-chunk", "uncached-batch", "objective-only")


def current_rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def build_encoder(name: str, image_size: int) -> nn.Module:
    if name == "resnet18":
        import timm

        return timm.create_model("resnet18", pretrained=False, num_classes=0)
    width = 2048
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * image_size * image_size, width), nn.GELU(), nn.LayerNorm(width),
        nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 128),
    )


def build_objective(name: str, labels: torch.Tensor):
    from losses import NTXentLoss, TripletMarginLoss
    from miners import BatchHardMiner

    if name == "ntxent":
        loss = NTXentLoss(temperature=0.1)
        return lambda e: loss(e, labels[: len(e)])
    loss, miner = TripletMarginLoss(margin=0.2), BatchHardMiner()
    return lambda e: loss(e, labels[: len(e)], miner(e, labels[: len(e)]))


def child(args: argparse.Namespace) -> dict:
    """Run one configuration in this process and return its numbers."""
    from losses import GradCache

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder, args.image_size).train()
    rows = args.chunk if args.config == "uncached-chunk" else args.batch
    images = torch.randn(rows, 3, args.image_size, args.image_size)
    labels = torch.arange(rows) // 4
    objective = build_objective(args.objective, labels)
    embeddings = None
    if args.config == "objective-only":
        with torch.no_grad():
            embeddings = torch.cat([encoder(c) for c in images.split(args.chunk)])

    def step():
        encoder.zero_grad(set_to_none=True)
        if args.config == "cached":
            return GradCache(args.chunk)([(encoder, images)], objective)
        if args.config == "objective-only":
            leaf = embeddings.detach().requires_grad_(True)
            loss = objective(leaf)
            loss.backward()
            return loss.detach()
        loss = objective(encoder(images))
        loss.backward()
        return loss.detach()

    before = current_rss_kb()
    times = [0.0]
    for i in range(1 if args.measure == "memory" else args.repeats + 1):
        start = time.perf_counter()
        step()
        if i == 1:
            times.clear()
        if i > 0:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": args.config, "rows": rows, "step_mb": (peak - before) / 1024, "peak_mb": peak / 1024,
            "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", choices=["resnet18", "mlp"], default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--objective", choices=["ntxent", "triplet"], default="ntxent")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)  # set in the child process
    parser.add_argument("--measure", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config:
        print(json.dumps(child(args)))
        return

    results = {}
    for config in CONFIGS:
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--config", config, "--measure"]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        memory = subprocess.run(cmd + ["memory"], check=True, capture_output=True, text=True, env=env).stdout
        timing = subprocess.run(cmd + ["time"], check=True, capture_output=True, text=True).stdout
        results[config] = json.loads(memory.strip().splitlines()[-1])
        results[config]["seconds"] = json.loads(timing.strip().splitlines()[-1])["seconds"]
        print(f"  ran {config}", file=sys.stderr)

    print(f"encoder={args.encoder} image={args.image_size}px objective={args.objective} batch={args.batch} "
          f"chunk={args.chunk} threads={args.threads} torch={torch.__version__}")
    print("step memory = peak RSS during the steps - RSS before them; ratios against the uncached rows")
    chunk_mem, batch_mem = results["uncached-chunk"]["step_mb"], results["uncached-batch"]["step_mb"]
    chunk_time, batch_time = results["uncached-chunk"]["seconds"], results["uncached-batch"]["seconds"]
    header = f"{'config':<16}{'rows':>6}{'step MB':>10}{'/ chunk':>9}{'/ batch':>9}{'seconds':>10}{'/ batch':>9}{'ms/row':>8}"
    print(header)
    for config in CONFIGS:
        r = results[config]
        print(f"{config:<16}{r['rows']:>6}{r['step_mb']:>10.0f}{r['step_mb'] / chunk_mem:>9.2f}{r['step_mb'] / batch_mem:>9.2f}"
              f"{r['seconds']:>10.2f}{r['seconds'] / batch_time:>9.2f}{1000 * r['seconds'] / r['rows']:>8.2f}")
    print(f"cached step time / uncached-batch step time: {results['cached']['seconds'] / batch_time:.2f} "
          f"(uncached-chunk x {args.batch // args.chunk} chunks would be {chunk_time * args.batch / args.chunk / batch_time:.2f}, "
          f"but a different loss)")


if __name__ == "__main__":
    main()
