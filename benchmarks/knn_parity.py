"""Our exact faiss-cpu search against faiss' raw flat search, interleaved repeat by repeat.

``benchmarks/knn.py`` times each method's repeats back to back, so a change of load or clock between methods
moves their ratio; here every repeat runs all four calls in turn (faiss k = 2, 3, 6, then ours with k = 2),
which is the comparison to read for "never slower than faiss raw". Same data as ``benchmarks/knn.py``.

Usage::

    python benchmarks/knn_parity.py --data lowrank      # m = 1000, n = 32768, d = 1024, 2 threads, 12 repeats
    python benchmarks/knn_parity.py --data digits --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import faiss
import torch
from knn import make_data

from lightning_memwatch.metrics.knn import NearestNeighbourIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["uniform", "lowrank", "digits"], default="lowrank")
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--n", type=int, default=32_768)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    train, queries = make_data(args.m, args.n, args.d, 0, args.data)
    q_np, x_np = queries.numpy(), train.numpy()
    index = NearestNeighbourIndex(train, backend="faiss-cpu")
    calls = {f"faiss raw k={k}": (lambda k=k: faiss.knn(q_np, x_np, k)) for k in (2, 3, 6)}
    calls["ours (exact, k=2)"] = lambda: index.search(queries, 2)
    for call in calls.values():
        call()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    base = seconds["faiss raw k=2"]
    print(
        f"{args.data}: m={args.m} n={args.n} d={args.d}, {args.threads} threads, {args.repeats} interleaved repeats, "
        f"faiss {faiss.__version__}, load average at end {os.getloadavg()[0]:.2f}"
    )
    print("| call | best s | median s | vs faiss raw k=2, best | vs faiss raw k=2, median |\n|---|---:|---:|---:|---:|")
    for name, times in seconds.items():
        print(
            f"| {name} | {min(times):.3f} | {statistics.median(times):.3f} | {min(base) / min(times):.2f}x | "
            f"{statistics.median(base) / statistics.median(times):.2f}x |"
        )
    print(f"uncertified rows (widened pass): {index.num_fallback} of {index.num_searched}")


if __name__ == "__main__":
    main()
