"""Sharded and streamed modes of ``benchmarks/knn.py`` (``--shards W ...``, ``--memmap``)."""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _mem_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _rank(rank: int, world: int, store: str, args, results) -> None:  # type: ignore[no-untyped-def]
    from knn_data import make_data

    from lightning_memwatch.metrics.knn_sharded import ShardedNearestNeighbourIndex

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, args.threads // world))
    train, queries = make_data(args.m[0], args.n, args.d, args.seed, args.data)
    lo, hi = rank * args.n // world, (rank + 1) * args.n // world
    shard = train[lo:hi].clone()
    del train
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = ShardedNearestNeighbourIndex(shard, backend=args.backend)
    index.search(queries[:50])
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        index.search(queries)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results.put((rank, min(times), hi - lo, peak, peak - base, index.backend))
    dist.destroy_process_group()


def run_shards(args) -> list[str]:  # type: ignore[no-untyped-def]
    lines = [
        f"sharded search: gloo processes on ONE machine ({os.cpu_count()} cores shared by all ranks, "
        f"{max(1, args.threads // max(args.shards))}+ threads each), m={args.m[0]}, n={args.n}, d={args.d}, "
        f"{args.data} data; per-rank search seconds (best of {args.repeats}) and peak RSS",
        "",
        "| W | backend | rows per rank | search s per rank (max) | sum over ranks | peak RSS per rank (max) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    ctx = mp.get_context("spawn")
    for world in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            results = ctx.Queue()
            procs = [ctx.Process(target=_rank, args=(r, world, f"{tmp}/store", args, results)) for r in range(world)]
            for p in procs:
                p.start()
            rows = [results.get(timeout=1800) for _ in procs]
            for p in procs:
                p.join()
        secs = [r[1] for r in rows]
        lines.append(
            f"| {world} | {rows[0][5]} | {max(r[2] for r in rows):,} | {max(secs):.3f} | {sum(secs):.3f} "
            f"| {max(r[3] for r in rows) / 2**30:.2f} GiB |"
        )
    return lines


def run_memmap(args) -> list[str]:  # type: ignore[no-untyped-def]

    from lightning_memwatch.metrics.knn import NearestNeighbourIndex

    m, n, d = args.m[0], args.n, args.d
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "train.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        g = torch.Generator().manual_seed(args.seed)
        for j in range(0, n, 8192):  # written in blocks: the set is never whole in memory
            out[j : j + 8192] = torch.rand(min(8192, n - j), d, generator=g).numpy()
        out.flush()
        del out
        queries = torch.rand(m, d, generator=g)
        mm = np.load(path, mmap_mode="r")
        queries[: m // 10] = torch.from_numpy(np.array(mm[: m // 10]))
        before = _mem_status()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index = NearestNeighbourIndex(mm, backend=args.backend)  # type: ignore[arg-type]
        build = time.perf_counter() - start
        start = time.perf_counter()
        _, idx = index.search(queries)
        search = time.perf_counter() - start
        after = _mem_status()
        assert idx[: m // 10, 0].tolist() == list(range(m // 10))
        size = n * d * 4
        return [
            f"streamed search of a {size / 2**30:.2f} GiB float32 .npy memmap (n={n}, d={d}, m={m}, backend "
            f"{index.backend}): build {build:.1f} s, search {search:.1f} s",
            f"anonymous memory (RssAnon) {before['RssAnon'] / 2**30:.3f} -> {after['RssAnon'] / 2**30:.3f} GiB; "
            f"file pages mapped (RssFile, reclaimable page cache) {after['RssFile'] / 2**30:.3f} GiB; "
            f"peak RSS (VmHWM, anonymous + file pages) {after['VmHWM'] / 2**30:.3f} GiB",
        ]
