"""The exact search on one device: float32 path against the bfloat16 screen (and faiss-gpu where installed).

For each backend: build seconds, search seconds (median of interleaved repeats, synchronised), the search's
work (scans per search, queries certified at once, candidates) and the agreement of the first 200 queries
with a float64 brute force (distances to 1e-9 relative; indices where the float64 gaps are clear). Runs on
CUDA-less torch too (``--device cpu``), which is what ``benchmarks/gpu_check.sh --dry-run`` exercises.

Usage::

    python benchmarks/knn_gpu.py --device cuda --n 1000000 --m 10000 --d 1024 --data uniform
    python benchmarks/knn_gpu.py --device cpu --n 2048 --m 100 --d 64 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from knn_data import KINDS, make_data  # beside this file

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends

CHECK = 200


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check(index: NearestNeighbourIndex, queries: torch.Tensor, train: torch.Tensor) -> str:
    q = queries[:CHECK].double()
    d2, idx = index.search_squared(index.prepare_queries(queries[:CHECK]), 2)
    best = torch.full((len(q), 3), torch.inf, dtype=torch.float64, device=q.device)
    best_i = torch.zeros(len(q), 3, dtype=torch.int64, device=q.device)
    for j in range(0, len(train), 65536):
        t = train[j : j + 65536].double()
        full = ((q[:, None, :] - t[None]) ** 2).sum(dim=2) if q.device.type == "cpu" else torch.cdist(q, t) ** 2
        both_d, both_i = (
            torch.cat([best, full], 1),
            torch.cat([best_i, torch.arange(j, j + len(t), device=q.device).expand(len(q), -1)], 1),
        )
        order = torch.topk(both_d, 3, dim=1, largest=False).indices
        best, best_i = torch.gather(both_d, 1, order), torch.gather(both_i, 1, order)
    best, order = best.sort(dim=1, stable=True)
    best_i = torch.gather(best_i, 1, order)
    close = ((d2 - best[:, :2]).abs() <= 1e-9 * best[:, :2].abs() + 1e-12).all(dim=1)
    clear = (best[:, 1] - best[:, 0] > 1e-9 * best[:, 1]) & (best[:, 2] - best[:, 1] > 1e-9 * best[:, 2])
    same = (idx == best_i[:, :2]).all(dim=1) | ~clear
    return f"{int((close & same).sum())}/{len(q)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", choices=KINDS, default="uniform")
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--m", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    train, queries = make_data(args.m, args.n, args.d, 0, args.data)
    train, queries = train.to(device), queries.to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.data}: m={args.m} n={args.n} d={args.d} on {name}, torch {torch.__version__}")
    indexes: dict[str, NearestNeighbourIndex] = {}
    build: dict[str, float] = {}
    for backend in [b for b in ("torch", "torch-bf16", "faiss-gpu") if b in available_backends(device)]:
        _sync(device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            indexes[backend] = NearestNeighbourIndex(train, backend=backend)  # type: ignore[arg-type]
        _sync(device)
        build[backend] = time.perf_counter() - start
    times: dict[str, list[float]] = {b: [] for b in indexes}
    for index in indexes.values():
        index.search(queries[: min(args.m, 256)])  # warm-up
    for _ in range(args.repeats):
        for backend, index in indexes.items():
            _sync(device)
            start = time.perf_counter()
            index.search(queries)
            _sync(device)
            times[backend].append(time.perf_counter() - start)
    print("| backend | build s | search s (median) | scans | certified at once | candidates | = float64 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend, index in indexes.items():
        s = index.last_search
        assert s is not None
        row = f"{s.scans} | {s.certified_at_once}/{s.queries} | {s.candidates}"
        print(
            f"| {backend} | {build[backend]:.2f} | {statistics.median(times[backend]):.3f} | {row} "
            f"| {_check(index, queries, train)} |"
        )
    if "torch" in times and "torch-bf16" in times:
        ratio = statistics.median(times["torch"]) / statistics.median(times["torch-bf16"])
        print(f"bf16 screen vs float32 path: {ratio:.2f}x")


if __name__ == "__main__":
    main()
