"""Benchmark: how much of a training set on disk the callbacks read at setup, against how they read it before.

The training set is a map-style Dataset of ``--n`` ``(image, class)`` items, each image of 3 x ``--size`` x
``--size`` made on read (as a decoder of files would: one seeded draw per image). Each way runs in a fresh
subprocess and prints its wall-clock seconds and its peak resident memory (``ru_maxrss``):

* ``probe``: ``LossGapProbe``'s triples (``draw_probe_triples``, 256 of them, held-out set a tensor of 1,000
  images), reading only the drawn rows; ``probe-before``: the whole set read first (as the probe did before);
* ``labels``: a class-conditional MemWatch's training images and classes, read in one pass
  (``read_labelled_images``); ``labels-before``: the images, then the labels in a second pass (as before).

Usage::

    python benchmarks/setup_reads.py                      # n = 100,000 images of 3 x 32 x 32
    python benchmarks/setup_reads.py --n 20000 --size 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WAYS = ("probe", "probe-before", "labels", "labels-before")


def _measure(way: str, n: int, size: int) -> dict[str, float]:
    import resource
    import time

    import torch
    from torch.utils.data import Dataset

    from lightning_memwatch.images import collect_images
    from lightning_memwatch.labels import read_labelled_images, read_train_labels
    from lightning_memwatch.metrics.loss_gap import draw_probe_triples

    class MadeOnRead(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            gen = torch.Generator().manual_seed(int(i))
            return torch.rand(3, size, size, generator=gen) * 2 - 1, int(i) % 10

    heldout = torch.rand(1000, 3, size, size, generator=torch.Generator().manual_seed(-1)) * 2 - 1
    start = time.perf_counter()
    if way == "probe":
        draw_probe_triples(MadeOnRead(), heldout, num_triples=256)
    elif way == "probe-before":
        draw_probe_triples(collect_images(MadeOnRead()), heldout, num_triples=256)
    elif way == "labels":
        read_labelled_images(MadeOnRead())
    else:
        collect_images(MadeOnRead()), read_train_labels(MadeOnRead())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="training images")
    parser.add_argument("--size", type=int, default=32, help="image side (pixels)")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one measurement (the child process)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(_measure(args.way, args.n, args.size)))
        return
    print(f"n = {args.n:,} (image, class) items of 3 x {args.size} x {args.size}, made on read")
    for way in WAYS:
        command = [sys.executable, __file__, "--way", way, "--n", str(args.n), "--size", str(args.size)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(f"  {way:14s} {result['seconds']:7.2f} s, peak {result['peak_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
