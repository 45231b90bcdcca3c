"""Worker for test_knn_sharded.py: W gloo processes compare the sharded index with one process's index.

Usage: python _knn_sharded_worker.py WORLD_SIZE TMPDIR   (spawns WORLD_SIZE processes; rank r writes rank{r}.ok)
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends
from lightning_memwatch.metrics.knn_sharded import ShardedNearestNeighbourIndex

SIZES = {2: [120, 83], 4: [0, 50, 100, 53]}  # uneven; rank 0 of 4 holds no rows


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """Dyadic rows (multiples of 2**-12 in [-1, 1)): every squared distance is exact in float64 in any order,
    so one process and W shards must give bit-identical distances (guaranteed by construction)."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(-4096, 4096, (203, 3, 2, 2), generator=g).float() / 4096
    train[150] = train[10]  # duplicates across shards
    train[190] = train[60]
    queries = torch.randint(-4096, 4096, (40, 3, 2, 2), generator=g).float() / 4096
    queries[:6] = train[[0, 10, 60, 150, 119, 120]]  # copies, incl. of the duplicated rows and shard edges
    e = torch.zeros(3, 2, 2)
    e[0, 0, 0] = 2.0**-6
    train[5], train[170] = queries[7] + e, queries[7] - e  # an exact tie across shards: lower row wins
    return train, queries


def check(rank: int, world: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    train, queries = dataset()
    sizes = SIZES[world]
    lo = sum(sizes[:rank])
    shard = train[lo : lo + sizes[rank]]
    checks = 0
    for backend in [b for b in available_backends("cpu") if b != "faiss-gpu"]:
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore")
            single = NearestNeighbourIndex(train, backend=backend)
            sharded = ShardedNearestNeighbourIndex(shard, backend=backend, database_block_size=16)
        assert sharded.num_train == single.num_train == 201, (sharded.num_train, single.num_train)
        for k in (1, 2, 5):
            want_d, want_i = single.search(queries, k)
            got_d, got_i = sharded.search(queries, k)
            assert torch.equal(got_i, want_i), (backend, k, got_i, want_i)
            assert torch.equal(got_d, want_d), (backend, k)
            checks += 1
        assert got_i[7, 0] == 5 and got_d[7, 0] == got_d[7, 1]  # the tie went to the lower global row
        assert sharded.search(queries[:3], 2)[1][:, 0].tolist() == [0, 10, 60]
        images = sharded.train_images(got_i[:4, :2])
        assert torch.equal(images, train[got_i[:4, :2]])
    # streamed shards (float32 memmaps) combine with sharding
    path = Path(tmp) / f"shard{rank}.npy"
    np.save(path, shard.numpy())
    mm = np.load(path, mmap_mode="r")
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        streamed = ShardedNearestNeighbourIndex(mm, backend="torch", database_block_size=16)
    want_d, want_i = NearestNeighbourIndex(train, backend="torch").search(queries, 2)
    got_d, got_i = streamed.search(queries, 2)
    assert torch.equal(got_i, want_i) and torch.equal(got_d, want_d)
    checks += 1
    # bad input raises on every rank, with the offending rank named
    bad = shard.reshape(len(shard), -1)[:, :6] if rank == world - 1 else shard
    try:
        ShardedNearestNeighbourIndex(bad, backend="torch")
    except ValueError as err:
        assert "different dimensions" in str(err), err
        checks += 1
    try:
        ShardedNearestNeighbourIndex(None if rank == 1 else shard, backend="torch")
    except ValueError as err:
        assert "rank 1 joined with no training data" in str(err), err
        checks += 1
    (Path(tmp) / f"rank{rank}.ok").write_text(str(checks))
    dist.destroy_process_group()


if __name__ == "__main__":
    world, tmp = int(sys.argv[1]), sys.argv[2]
    mp.start_processes(check, args=(world, tmp), nprocs=world, start_method="spawn", join=True)
