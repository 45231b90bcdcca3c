"""Benchmark: exact k=2 nearest-neighbour search of generated samples in the training set.

Times, in one run and interleaved (so that load from other processes hits every method alike):

* this machine's fp32 GEMM throughput (``torch.mm`` over the same (m x d) @ (d x n) product, in the column
  tiles our torch backend uses, and one 2048 x 1024 x 4096 product); the best of these is "peak";
* our :class:`NearestNeighbourIndex`, for every backend present (exact: candidates re-ranked and certified);
* faiss' own flat search (``faiss.knn``, k=2, squared float32 distances, no exactness step), for reference;
* ``torch.cdist`` + ``topk`` in blocks of 1024 queries (the usual torch baseline);
* the authors' broadcast-norm approach, ``torch.norm(s[:, None] - X, dim=2).topk(2)`` over small batches;
  it is memory-bound and slow, so it is timed on a subset of the queries and its rate is reported.

Throughput is ``2 m n d / seconds`` (GFLOP/s) for every method. Every method's nearest-neighbour indices are
checked against float64 brute force on a subset of queries.

Usage::

    python benchmarks/knn.py                    # the paper's setting: m = 10000 and 1000, n = 32768, d = 1024
    python benchmarks/knn.py --quick            # a small smoke run
    python benchmarks/knn.py --m 1000 --n 16384 --d 512 --repeats 5 --threads 2
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

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends

try:
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

CHECK_QUERIES = 200
CDIST_BLOCK = 1024


@dataclass
class Method:
    name: str
    run: Callable[[], tuple[torch.Tensor, torch.Tensor] | None]
    flops: float
    note: str = ""
    is_gemm: bool = False
    check: Callable[[], torch.Tensor] | None = None  # returns indices (CHECK_QUERIES, 2) on the check subset
    times: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _float64_reference(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    q = queries.double().cpu()
    d2 = torch.cat(
        [(q * q).sum(1, keepdim=True) + (t * t).sum(1) - 2 * q @ t.T for t in train.double().cpu().split(8192)],
        dim=1,
    )
    return d2.topk(2, dim=1, largest=False).indices


def _methods(m: int, n: int, d: int, device: torch.device, seed: int) -> tuple[list[Method], dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(n, d, generator=g)  # image-like: pixels in [0, 1]
    queries = torch.rand(m, d, generator=g)
    queries[: m // 10] = train[torch.randint(0, n, (m // 10,), generator=g)]  # 10% exact copies
    train, queries = train.to(device), queries.to(device)
    flops = 2.0 * m * n * d
    methods: list[Method] = []
    info: dict[str, str] = {}
    check_q = queries[:CHECK_QUERIES]

    # --- GEMM peak
    tile = 4096
    out = torch.empty(min(m, 1024), tile, device=device)

    def gemm_problem() -> None:
        for i in range(0, m, 1024):
            qb = queries[i : i + 1024]
            for j in range(0, n, tile):
                tb = train[j : j + tile]
                torch.mm(qb, tb.T, out=out[: len(qb), : len(tb)] if len(tb) == tile and len(qb) == len(out) else None)

    methods.append(Method("torch.mm, same product in tiles", gemm_problem, flops, "GEMM only", is_gemm=True))
    a, b = torch.rand(2048, 1024, device=device), torch.rand(1024, 4096, device=device)
    methods.append(
        Method(
            "torch.mm 2048x1024 @ 1024x4096",
            lambda: torch.mm(a, b),
            2.0 * 2048 * 1024 * 4096,
            "GEMM only",
            is_gemm=True,
        )
    )

    # --- ours, every backend present
    for backend in available_backends(device):
        if backend == "faiss-cpu" and device.type == "cuda":
            continue
        index = NearestNeighbourIndex(train, backend=backend)  # type: ignore[arg-type]
        info[f"index[{backend}]"] = repr(index)
        methods.append(
            Method(
                f"ours: NearestNeighbourIndex({backend})",
                lambda index=index: index.search(queries, k=2),
                flops,
                "exact (re-ranked, certified)",
                check=lambda index=index: index.search(check_q, k=2)[1],
            )
        )
        methods[-1].index = index  # type: ignore[attr-defined]

    # --- faiss' own flat search, for reference
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

    # --- torch.cdist + topk in query blocks
    def cdist_topk(q: torch.Tensor = queries) -> torch.Tensor:
        parts = [torch.cdist(qb, train).topk(2, dim=1, largest=False).indices for qb in q.split(CDIST_BLOCK)]
        return torch.cat(parts)

    methods.append(
        Method("torch.cdist + topk, blocks of 1024", cdist_topk, flops, "baseline", check=lambda: cdist_topk(check_q))
    )

    # --- the authors' broadcast-norm approach, on a subset (it materialises batch x n x d)
    batch = max(1, (512 * 2**20) // (n * d * 4))
    subset = min(m, max(4 * batch, 16))
    sub_q = queries[:subset]

    def broadcast_norm(q: torch.Tensor = sub_q) -> torch.Tensor:
        parts = [
            torch.norm(qb[:, None, :] - train[None], dim=2, p=2).topk(2, dim=1, largest=False).indices
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
    info["check"] = f"indices vs float64 brute force on the first {min(m, CHECK_QUERIES)} queries"
    info["_reference"] = ""
    methods_ref = _float64_reference(check_q, train)
    for method in methods:
        method.reference = methods_ref  # type: ignore[attr-defined]
    return methods, info


def run_shape(m: int, n: int, d: int, repeats: int, device: torch.device, seed: int) -> str:
    methods, info = _methods(m, n, d, device, seed)
    for method in methods:  # warm-up (and first-touch allocations)
        method.run()
    for _ in range(repeats):  # interleaved, so that background load hits every method alike
        for method in methods:
            method.times.append(_time(method.run, device))
    rate = {x.name: x.flops / min(x.times) / 1e9 for x in methods}
    peak = max(rate[x.name] for x in methods if x.is_gemm)
    cdist = next(rate[x.name] for x in methods if x.name.startswith("torch.cdist"))
    lines = [
        f"m={m} queries, n={n} training rows, d={d}, k=2, {torch.get_num_threads()} threads, device {device}, "
        f"best of {repeats} (median in brackets)",
        "",
        "| method | seconds | GFLOP/s | % of GEMM peak | vs cdist+topk | indices exact | note |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for x in methods:
        agree = "-"
        if x.check is not None:
            got = x.check().cpu()
            ref = x.reference  # type: ignore[attr-defined]
            agree = f"{int((got == ref).all(dim=1).sum())}/{len(ref)}"
        note = x.note
        if hasattr(x, "index"):
            note += f"; fallback rows {x.index.num_fallback}/{x.index.num_searched}"  # type: ignore[attr-defined]
        best, median = min(x.times), statistics.median(x.times)
        lines.append(
            f"| {x.name} | {best:.3f} ({median:.3f}) | {rate[x.name]:.1f} | {100 * rate[x.name] / peak:.0f}% "
            f"| {rate[x.name] / cdist:.2f}x | {agree} | {note} |"
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=[10_000, 1_000], help="query counts (generated)")
    parser.add_argument("--n", type=int, default=32_768, help="training rows")
    parser.add_argument("--d", type=int, default=1024, help="dimension (1x32x32 images: 1024)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (best is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run (m=1000,200; n=4096; d=256)")
    args = parser.parse_args(argv)
    if args.quick:
        args.m, args.n, args.d, args.repeats = [1000, 200], 4096, 256, 1
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# kNN benchmark\n\n{machine()}\nload average at start: {os.getloadavg()}\n")
    with torch.no_grad():
        for m in args.m:
            print(run_shape(m, args.n, args.d, args.repeats, device, args.seed))
            print()
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
