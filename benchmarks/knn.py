"""Benchmark: exact k=2 nearest-neighbour search of generated samples in the training set.

Times, in one run and interleaved (so that load from other processes hits every method alike):

* this machine's fp32 GEMM throughput: ``torch.mm`` over the same (m x d) @ (d x n) product in the tiles our
  torch backend uses, and one 2048 x 1024 x 4096 product with ``torch.mm`` and with numpy's BLAS; the
  fastest of these is "peak";
* our :class:`NearestNeighbourIndex`, for every backend present (exact: candidates re-ranked and certified);
* faiss' own flat search (``faiss.knn``, k=2, squared float32 distances, no exactness step), for reference;
* ``torch.cdist`` + ``topk`` in blocks of 1024 queries (the usual torch baseline);
* the authors' broadcast-norm approach, ``torch.norm(s[:, None] - X, dim=2).topk(2)`` over small batches;
  it is memory-bound and slow, so it is timed on a subset of the queries and its rate is reported.

Throughput is ``2 m n d / seconds`` (GFLOP/s) for every method. Each method's nearest-neighbour indices are
checked against a float64 brute force on the first 200 queries. Data (``benchmarks/knn_data.py``): training rows
uniform in [0, 1] (image-like), queries uniform with 10% exact copies of training rows; or ``--data lowrank``,
``digits``, ``saturated`` (near-tie-dense: half of the pixels at exactly 1.0). Our indices also report their
work: scans of the training set per search and candidates re-ranked exactly.

Usage::

    python benchmarks/knn.py                    # the paper's setting: m = 10000 and 1000, n = 32768, d = 1024
    python benchmarks/knn.py --quick            # a small smoke run
    python benchmarks/knn.py --m 1000 --n 16384 --d 512 --repeats 5 --threads 2
    python benchmarks/knn.py --data lowrank     # structured, image-like training set (low intrinsic dimension)
    python benchmarks/knn.py --data digits --backends faiss-cpu torch   # real digits upsampled; some backends
    python benchmarks/knn.py --data saturated --m 1000   # near-tie-dense images (half the pixels at 1.0)
    python benchmarks/knn.py --shards 1 2 4 --m 1000   # sharded: W gloo processes on this machine, per rank
    python benchmarks/knn.py --memmap --n 262144 --d 1024 --m 1000   # streamed search of a 1 GiB .npy memmap
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from knn_data import KINDS, make_data  # beside this file

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends

try:
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

CHECK_QUERIES = 200
CDIST_BLOCK = 1024
TARGET_PEAK, TARGET_CDIST = 0.80, 1.5
SETTLE_SECONDS = 0.5


@dataclass
class Method:
    name: str
    run: Callable[[], object]
    flops: float
    note: str = ""
    is_gemm: bool = False
    check: Callable[[], torch.Tensor] | None = None  # nearest-neighbour indices (CHECK_QUERIES, 2)
    index: NearestNeighbourIndex | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (less sensitive to load)


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _float64_indices(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    q = queries.double().cpu()
    blocks = [(q * q).sum(1, keepdim=True) + (t * t).sum(1) - 2 * q @ t.T for t in train.double().cpu().split(8192)]
    return torch.cat(blocks, dim=1).topk(2, dim=1, largest=False).indices


def _methods(train: torch.Tensor, queries: torch.Tensor, only: list[str] | None = None) -> list[Method]:
    (m, d), n, device = queries.shape, len(train), train.device
    flops = 2.0 * m * n * d
    check_q = queries[:CHECK_QUERIES]
    methods: list[Method] = []

    tile, out = 4096, torch.empty(1024, 4096, device=device)

    def gemm_problem() -> None:
        for qb in queries.split(1024):
            for tb in train.split(tile):
                full = len(qb) == len(out) and len(tb) == tile
                torch.mm(qb, tb.T, out=out if full else None)

    methods.append(Method("torch.mm, same product in tiles", gemm_problem, flops, "GEMM only", is_gemm=True))
    a, b = torch.rand(2048, 1024, device=device), torch.rand(1024, 4096, device=device)
    mm_flops = 2.0 * 2048 * 1024 * 4096
    methods.append(Method("torch.mm 2048x1024 @ 1024x4096", lambda: torch.mm(a, b), mm_flops, "GEMM only", True))
    if device.type == "cpu":
        a_np, b_np = a.numpy(), b.numpy()
        methods.append(Method("numpy float32 matmul, same shape", lambda: a_np @ b_np, mm_flops, "GEMM only", True))

    for backend in available_backends(device):
        if (backend == "faiss-cpu" and device.type == "cuda") or (only and backend not in only):
            continue
        index = NearestNeighbourIndex(train, backend=backend)  # type: ignore[arg-type]
        methods.append(
            Method(
                f"ours: NearestNeighbourIndex({backend})",
                lambda index=index: index.search(queries, k=2),
                flops,
                "exact (re-ranked, certified)",
                check=lambda index=index: index.search(check_q, k=2)[1],
                index=index,
            )
        )

    if faiss is not None and device.type == "cpu":
        train_np, queries_np = train.numpy(), queries.numpy()
        methods.append(
            Method(
                "faiss.knn (flat L2, raw)",
                lambda: faiss.knn(queries_np, train_np, 2),
                flops,
                "squared fp32 distances, no exact step",
                check=lambda: torch.from_numpy(faiss.knn(check_q.numpy(), train_np, 2)[1]),
            )
        )

    def cdist_topk(q: torch.Tensor = queries) -> torch.Tensor:
        return torch.cat([torch.cdist(qb, train).topk(2, dim=1, largest=False).indices for qb in q.split(CDIST_BLOCK)])

    methods.append(
        Method("torch.cdist + topk, blocks of 1024", cdist_topk, flops, "baseline", check=lambda: cdist_topk(check_q))
    )

    # The authors' approach materialises batch x n x d floats: keep a batch under 512 MiB, time a subset.
    batch = max(1, (512 * 2**20) // (n * d * 4))
    subset = min(m, max(4 * batch, 16))

    def broadcast_norm(q: torch.Tensor = queries[:subset]) -> torch.Tensor:
        parts = [
            torch.norm(qb[:, None, :] - train[None], dim=2).topk(2, dim=1, largest=False).indices
            for qb in q.split(batch)
        ]
        return torch.cat(parts)

    methods.append(
        Method(
            "paper: torch.norm(s - X) + topk",
            broadcast_norm,
            2.0 * subset * n * d,
            f"timed on {subset} queries, batches of {batch}",
            check=lambda: broadcast_norm(check_q),
        )
    )
    return methods


def run_shape(
    m: int,
    n: int,
    d: int,
    repeats: int,
    device: torch.device,
    seed: int,
    kind: str = "uniform",
    only: list[str] | None = None,
) -> str:
    train, queries = make_data(m, n, d, seed, kind)
    train, queries = train.to(device), queries.to(device)
    methods = _methods(train, queries, only)
    reference = _float64_indices(queries[:CHECK_QUERIES], train)
    for method in methods:  # warm-up (and first-touch allocations)
        method.run()
    for _ in range(repeats):  # interleaved, so that background load hits every method alike
        for method in methods:
            time.sleep(SETTLE_SECONDS)  # let the previous method's BLAS/OpenMP threads stop spinning
            wall, cpu = _time(method.run, device)
            method.times.append(wall)
            method.cpu_times.append(cpu)
    rate = {x.name: x.flops / min(x.times) / 1e9 for x in methods}
    peak = max(rate[x.name] for x in methods if x.is_gemm)
    cdist = next(rate[x.name] for x in methods if x.name.startswith("torch.cdist"))
    raw = next((rate[x.name] for x in methods if x.name.startswith("faiss.knn")), float("nan"))
    raw_cpu = next((min(x.cpu_times) for x in methods if x.name.startswith("faiss.knn")), float("nan"))
    flops_of_raw = 2.0 * m * n * d
    lines = [
        f"{kind} data, m={m} queries, n={n} training rows, d={d}, k=2, {torch.get_num_threads()} threads, "
        f"device {device}; "
        f"best of {repeats} repeats (median in brackets)",
        "",
        "| method | seconds | GFLOP/s | % of GEMM peak | vs cdist+topk | vs faiss raw | CPU s | vs faiss raw (CPU) "
        "| indices = float64 | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in methods:
        agree = "-"
        if x.check is not None:
            agree = f"{int((x.check().cpu() == reference).all(dim=1).sum())}/{len(reference)}"
        note = x.note
        if x.index is not None:
            x.index.search(queries, k=2)  # the timed search's work (the check above searched fewer queries)
            stats = x.index.last_search
            assert stats is not None
            note += (
                f"; scans per search {stats.scans}, certified at once {stats.certified_at_once}/{stats.queries}, "
                f"candidates {stats.candidates} ({stats.candidates_per_query:.2f} per query)"
            )
        best, median = min(x.times), statistics.median(x.times)
        lines.append(
            f"| {x.name} | {best:.3f} ({median:.3f}) | {rate[x.name]:.1f} | {100 * rate[x.name] / peak:.0f}% "
            f"| {rate[x.name] / cdist:.2f}x | {rate[x.name] / raw:.2f}x | {min(x.cpu_times):.3f} "
            f"| {raw_cpu / min(x.cpu_times) * x.flops / flops_of_raw:.2f}x | {agree} | {note} |"
        )
    lines.append("")
    auto = NearestNeighbourIndex(train[:2].clone() + torch.arange(2.0, device=device)[:, None]).backend
    for x in methods:
        if x.index is not None:
            frac, speedup = rate[x.name] / peak, rate[x.name] / cdist
            verdict = "met" if frac >= TARGET_PEAK and speedup >= TARGET_CDIST else "NOT met"
            lines.append(
                f"targets for {x.index.backend}{' (the auto backend here)' if x.index.backend == auto else ''}: "
                f"{100 * frac:.0f}% of GEMM peak (>= {100 * TARGET_PEAK:.0f}%), {speedup:.2f}x cdist+topk "
                f"(>= {TARGET_CDIST}x): {verdict}"
            )
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        f"CPU {cpu} ({os.cpu_count()} logical cores)",
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})",
        f"faiss {faiss.__version__}" if faiss is not None else "faiss not installed",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Exact k=2 nearest-neighbour search benchmark.")
    parser.add_argument("--m", type=int, nargs="+", default=[10_000, 1_000], help="query counts (generated)")
    parser.add_argument("--n", type=int, default=32_768, help="training rows")
    parser.add_argument("--d", type=int, default=1024, help="dimension (1x32x32 images: 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (best is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run (m=1000,200; n=4096; d=256)")
    parser.add_argument("--data", choices=KINDS, default="uniform", help="training set (see knn_data.py)")
    parser.add_argument("--backends", nargs="+", help="only these backends of ours (default: all available)")
    parser.add_argument("--shards", type=int, nargs="+", help="instead: sharded search with W gloo processes")
    parser.add_argument("--memmap", action="store_true", help="instead: streamed search of a .npy memmap")
    parser.add_argument("--backend", default="auto", help="backend of the sharded/streamed modes")
    args = parser.parse_args(argv)
    if args.shards or args.memmap:
        from knn_scale import run_memmap, run_shards  # beside this file

        torch.set_num_threads(args.threads)
        for line in run_shards(args) if args.shards else run_memmap(args):
            print(line)
        return
    if args.quick:
        args.m, args.n, args.d, args.repeats = [1000, 200], 4096, 256, 1
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    device = torch.device(args.device)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# kNN benchmark\n\n{machine()}; load average at start {load}\n")
    with torch.no_grad():
        for m in args.m:
            print(run_shape(m, args.n, args.d, args.repeats, device, args.seed, args.data, args.backends))
            print()
    print("load average at end " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
