"""Benchmark: time and peak memory of building (and holding) the nearest-neighbour index, against the data size.

Each case runs in a fresh subprocess: it makes the training set (float32, uniform in [0, 1], image-like), then
measures the build's wall-clock seconds (and GiB of input per second), the resident set size (RSS) before the
build, the peak during the build (``ru_maxrss`` of the process; the data are made, and a small index built and
searched to load the kernels, before the measured build), the RSS held afterwards against the resident memory
the module notes document for the backend, and one search of 1,000 queries with its work (scans of the
training set, candidates re-ranked exactly).

Usage::

    python benchmarks/memory.py                       # n=5,000 x 12,288 and n=50,000 x 3,072, both backends
    python benchmarks/memory.py --cases 100000x256 400000x256 --backends torch torch-bf16 faiss-cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 2**30


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(n: int, d: int, backend: str) -> None:
    import warnings

    import torch

    from lightning_memwatch.metrics.knn import NearestNeighbourIndex

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    # warm-up on a small set: the first use of each kernel maps library code into the RSS
    warm = torch.rand(600, d, generator=g)
    NearestNeighbourIndex(warm, backend=backend).search(warm[:50])  # type: ignore[arg-type]
    del warm
    train = torch.rand(n, d, generator=g)
    queries = torch.rand(1000, d, generator=g)
    queries[:100] = train[:100]
    data = train.numel() * 4
    before = _rss()
    # ru_maxrss is the peak of the whole process: the data are made first, so peak - before is the build's
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = NearestNeighbourIndex(train, backend=backend)  # type: ignore[arg-type]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = _rss() - before
    index.search(queries)
    stats = index.last_search
    assert stats is not None
    # the resident memory the module notes document: float32 rows, 20 bytes of norms and bias per row, and
    # torch-bf16's screening copy (3 D + 6 bfloat16 columns, padded to 32)
    documented = 4 * n * d + 20 * n + (2 * n * (-(-(3 * d + 6) // 32) * 32) if index.backend == "torch-bf16" else 0)
    # torch-int8's codes (D padded to 8 bytes), int32 code norms, float64 residuals and two row masks
    documented += n * (-(-d // 8) * 8) + 14 * n if index.backend == "torch-int8" else 0
    print(
        json.dumps(
            {
                "n": n,
                "d": d,
                "backend": index.backend,
                "data": data,
                "build_peak_above_data": peak - before,
                "held": held,
                "documented": documented,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                "scans": stats.scans,
                "candidates": stats.candidates,
                "searched": stats.queries,
            }
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["5000x12288", "50000x3072"], help="NxD cases")
    parser.add_argument("--backends", nargs="+", default=["torch", "torch-bf16"])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(int(args.child[0]), int(args.child[1]), args.child[2])
        return
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# index build memory (load average {load})\n")
    print(
        "| n x d | backend | data | build s | GiB/s | CPU s | build peak above data | held after build | documented "
        "| peak / documented | scans | candidates / query |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        n, d = (int(x) for x in case.split("x"))
        for backend in args.backends:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), str(d), backend],
                capture_output=True,
                text=True,
                check=True,
                timeout=1200,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            data, peak, doc = r["data"], r["build_peak_above_data"], r["documented"]
            print(
                f"| {n:,} x {d:,} | {r['backend']} | {data / GIB:.3f} GiB | {r['seconds']:.2f} "
                f"| {data / GIB / r['seconds']:.2f} | {r['cpu_seconds']:.2f} "
                f"| {peak / GIB:.3f} GiB ({peak / data:.2f}x) "
                f"| {r['held'] / GIB:.3f} GiB | {doc / GIB:.3f} GiB | {peak / doc:.2f} | {r['scans']} "
                f"| {r['candidates'] / r['searched']:.2f} |"
            )


if __name__ == "__main__":
    main()
