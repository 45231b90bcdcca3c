"""Our exact search against faiss' raw flat search, interleaved repeat by repeat, with the work of each search.

``benchmarks/knn.py`` times each method's repeats back to back, so a change of load or clock between methods
moves their ratio; here every repeat runs every call in turn (faiss raw k = 2, then ours with k = 2 for each
backend), which is the comparison to read for "never slower than faiss raw". Each of our rows also reports the
machine-independent work of its search: scans of the training set per search, queries certified at once and
candidates re-ranked exactly (``NearestNeighbourIndex.last_search``). Data: ``benchmarks/knn_data.py``.

Usage::

    python benchmarks/knn_parity.py --data saturated   # m = 1000, n = 32768, d = 1024, 2 threads, 12 repeats
    python benchmarks/knn_parity.py --data uniform --m 10000 --repeats 5
    python benchmarks/knn_parity.py --data digits --backends faiss-cpu torch torch-bf16 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from knn_data import KINDS, make_data  # beside this file

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends

try:
    import faiss
except ImportError:  # pragma: no cover - the GPU image has no faiss
    faiss = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=KINDS, default="saturated")
    parser.add_argument("--m", type=int, default=1000)
    parser.add_argument("--n", type=int, default=32_768)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", help="ours to time (default: every one available but faiss-gpu)")
    parser.add_argument(
        "--tile-kernel",
        choices=["auto", "blas", "onednn"],
        default="auto",
        help="force the float32 tile's GEMM on CPU (default: knn.backends.float32_tile_kernel's choice)",
    )
    args = parser.parse_args(argv)
    if args.tile_kernel != "auto":
        from lightning_memwatch.metrics.knn import scan

        scan.float32_tile_kernel = lambda device: args.tile_kernel if device.type == "cpu" else "blas"
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    device = torch.device(args.device)
    train, queries = make_data(args.m, args.n, args.d, 0, args.data)
    train, queries = train.to(device), queries.to(device)
    calls: dict[str, Callable[[], object]] = {}
    if faiss is not None and device.type == "cpu":
        q_np, x_np = queries.numpy(), train.numpy()
        calls["faiss raw k=2"] = lambda: faiss.knn(q_np, x_np, 2)
    backends = args.backends or [b for b in available_backends(device) if b != "faiss-gpu"]
    indexes = {b: NearestNeighbourIndex(train, backend=b) for b in backends}  # type: ignore[arg-type]
    for backend, index in indexes.items():
        calls[f"ours {backend} (exact, k=2)"] = lambda index=index: index.search(queries, 2)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for call in calls.values():
        call()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            seconds[name].append(time.perf_counter() - start)
    base = seconds.get("faiss raw k=2")
    print(
        f"{args.data}: m={args.m} n={args.n} d={args.d}, device {device}, {args.threads} threads, {args.repeats} "
        f"interleaved repeats, faiss {faiss.__version__ if faiss else 'absent'}, "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )
    print("| call | best s | median s | vs faiss raw, median | scans per search | certified at once | candidates |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, times in seconds.items():
        ratio = f"{statistics.median(base) / statistics.median(times):.2f}x" if base else "-"
        work = "- | - | -"
        backend = name.split()[1] if name.startswith("ours") else ""
        if backend in indexes:
            s = indexes[backend].last_search
            assert s is not None
            work = f"{s.scans} | {s.certified_at_once}/{s.queries} | {s.candidates} ({s.candidates_per_query:.2f}/q)"
        print(f"| {name} | {min(times):.3f} | {statistics.median(times):.3f} | {ratio} | {work} |")


if __name__ == "__main__":
    main()
