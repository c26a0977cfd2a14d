"""Images per second of the benchmark DataModules' train loaders, on miniature copies of the formats.

    python benchmarks/loader_throughput.py [--workers 0 2] [--size 224] [--image-side 40 500]

Decoding and augmenting JPEGs is the bottleneck of these benchmarks on a GPU: this measures the
train loader alone (RandomResizedCrop + flip + normalise to ``--size``), for each DataModule, number
of workers and source image side (the miniatures' 40 px JPEGs, and e.g. 500 px, about the real
datasets' resolution). The first batches (worker start-up) are excluded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import datamodules  # noqa: E402
import tests.datamodules.miniature as mini  # noqa: E402


def throughput(dm, batches: int, warmup: int = 2) -> float:
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(it)[0])
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--size", type=int, default=224, help="network input side")
    parser.add_argument("--image-side", type=int, nargs="+", default=[40, 500], help="side of the generated JPEGs")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    # As in a DataLoader worker: one intra-op thread, so workers=0 measures the data path and not
    # thread contention between tiny tensor ops (Normalize) on a busy machine.
    torch.set_num_threads(1)
    original = mini.write_jpeg
    print(f"{'datamodule':<22}{'jpeg':>6}{'workers':>9}{'images/s':>10}")
    for side in args.image_side:
        mini.write_jpeg = lambda path, seed, size=None, _s=side: original(path, seed, size=(_s, _s * 3 // 4))
        with tempfile.TemporaryDirectory() as tmp:
            for class_path, make in mini.MINIATURES.items():
                init = make(Path(tmp) / class_path)
                cls = getattr(datamodules, class_path.split(".")[-1])
                for workers in args.workers:
                    dm = cls(**init, image_size=args.size, classes_per_batch=4, samples_per_class=2,
                             num_batches=args.batches + 2, num_workers=workers, repeat_small_classes=True)
                    rate = throughput(dm, args.batches)
                    print(f"{cls.__name__:<22}{side:>6}{workers:>9}{rate:>10.0f}", flush=True)
    mini.write_jpeg = original


if __name__ == "__main__":
    main()
