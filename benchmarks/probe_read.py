"""Benchmark: drawing the loss-gap probe's triples from a training set on disk, only the drawn rows against the
whole set read first (what ``LossGapProbe`` did before it read only the drawn rows).

The training set is a map-style Dataset of ``--n`` images of 3 x ``--size`` x ``--size`` made on each read
(as a decoder of files would: one seeded draw per image); the held-out set is a tensor of 1,000 images. Each way
runs in a fresh subprocess and prints its wall-clock seconds and its peak resident memory (``ru_maxrss``).

Usage::

    python benchmarks/probe_read.py                      # n = 100,000 images of 3 x 32 x 32, 256 triples
    python benchmarks/probe_read.py --n 20000 --size 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _measure(way: str, n: int, size: int, num_triples: int) -> dict[str, float]:
    import resource
    import time

    import torch
    from torch.utils.data import Dataset

    from lightning_memwatch.images import collect_images
    from lightning_memwatch.metrics.loss_gap import draw_probe_triples

    class MadeOnRead(Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            gen = torch.Generator().manual_seed(int(i))
            return torch.rand(3, size, size, generator=gen) * 2 - 1, int(i) % 10

    heldout = torch.rand(1000, 3, size, size, generator=torch.Generator().manual_seed(-1)) * 2 - 1
    start = time.perf_counter()
    train = MadeOnRead() if way == "drawn" else collect_images(MadeOnRead())
    draw_probe_triples(train, heldout, num_triples=num_triples)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="training images")
    parser.add_argument("--size", type=int, default=32, help="image side (pixels)")
    parser.add_argument("--num-triples", type=int, default=256)
    parser.add_argument("--way", choices=["drawn", "whole"], help=argparse.SUPPRESS)  # one measurement (child)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(_measure(args.way, args.n, args.size, args.num_triples)))
        return
    results = {}
    for way in ("drawn", "whole"):
        command = [sys.executable, __file__, "--way", way, "--n", str(args.n), "--size", str(args.size),
                   "--num-triples", str(args.num_triples)]  # fmt: skip
        results[way] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    drawn, whole = results["drawn"], results["whole"]
    print(f"n = {args.n:,} images of 3 x {args.size} x {args.size}, {args.num_triples} triples")
    print(f"  drawn rows only:       {drawn['seconds']:7.2f} s, peak {drawn['peak_gib']:.2f} GiB")
    print(f"  whole set read first:  {whole['seconds']:7.2f} s, peak {whole['peak_gib']:.2f} GiB")
    saved = whole["peak_gib"] - drawn["peak_gib"]
    print(f"  speed-up {whole['seconds'] / drawn['seconds']:.0f}x, peak memory saved {saved:.2f} GiB")


if __name__ == "__main__":
    main()
