"""Exact re-ranking: float64 distances of the candidates from the original float32 rows, best ``k`` per query.

The scan (:mod:`.scan`) certifies that every training row that can be among a query's ``k`` nearest is one of
its candidates; here each candidate gets ``||q - t||^2`` from float64 differences of the float32 values, and
the ``k`` smallest are kept, ties going to the lower row. Results are therefore those of a float64 brute force.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch.metrics.knn.rows import HeldRows

__all__ = ["best_per_query", "exact_sq", "pair_distances"]

# Queries per chunk of the exact re-ranking, and at most this many bytes of float64 differences per chunk, so
# that a chunk stays in cache at any dimension.
RERANK_CHUNK = 64
RERANK_BYTES = 4 * 2**20
# CPU re-ranking runs in numpy, single-threaded: many small OpenMP regions cost more than the work itself when
# the cores are shared (a training job's data loaders, other processes).
NUMPY_ON_CPU = True


def exact_sq(source: HeldRows, q: Tensor, cand: Tensor, device: torch.device) -> Tensor:
    """``||q[i] - rows[cand[i, j]]||^2`` from float64 differences of the float32 rows, ``(b, c)`` float64."""
    out = torch.empty(cand.shape, dtype=torch.float64, device=device)
    dim = source.dim
    if device.type == "cpu" and NUMPY_ON_CPU:
        q_np, cand_np, out_np = q.numpy(), cand.numpy(), out.numpy()
        chunk = max(1, min(RERANK_CHUNK, RERANK_BYTES // max(1, 8 * cand.shape[1] * dim)))
        for i in range(0, len(q), chunk):
            diff = source.gather_np(cand_np[i : i + chunk]).astype(np.float64)
            diff -= q_np[i : i + chunk, None, :]
            out_np[i : i + chunk] = np.einsum("ijk,ijk->ij", diff, diff)
        return out
    step = 64 * RERANK_CHUNK
    for i in range(0, len(q), step):
        diff = source.gather(cand[i : i + step]).to(device, torch.float64)
        diff -= q[i : i + step, None, :].to(torch.float64)
        out[i : i + step] = (diff * diff).sum(dim=2)
    return out


def pair_distances(source: HeldRows, q: Tensor, pair_q: Tensor, pair_t: Tensor, device: torch.device) -> Tensor:
    """Exact squared distances (float64) between ``q[pair_q]`` and rows ``pair_t``, one per pair."""
    out = torch.empty(len(pair_q), dtype=torch.float64, device=device)
    if device.type == "cpu" and NUMPY_ON_CPU:  # gathers in small chunks, in cache (no copy of q per pair)
        q_np, pq, pt, out_np = q.numpy(), pair_q.numpy(), pair_t.numpy(), out.numpy()
        chunk = max(1, RERANK_BYTES // max(1, 8 * source.dim))

        def work(i: int) -> None:  # numpy releases the GIL: chunks run in torch's threads
            diff = source.gather_np(pt[i : i + chunk]).astype(np.float64)
            diff -= q_np[pq[i : i + chunk]]
            out_np[i : i + chunk] = np.einsum("ij,ij->i", diff, diff)

        starts = range(0, len(pq), chunk)
        if len(starts) > 1 and torch.get_num_threads() > 1:
            with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
                list(pool.map(work, starts))
        else:
            for i in starts:
                work(i)
        return out
    step = 64 * RERANK_CHUNK
    for i in range(0, len(pair_q), step):
        out[i : i + step] = exact_sq(source, q[pair_q[i : i + step]], pair_t[i : i + step, None], device)[:, 0]
    return out


def best_per_query(num_queries: int, k: int, pair_q: Tensor, pair_t: Tensor, pair_d2: Tensor) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest (squared distance, row) per query from distinct pairs, ties by lower row.

    Queries with fewer than ``k`` pairs get ``inf`` and row ``-1`` in the missing places.
    """
    device = pair_d2.device
    order = torch.argsort(pair_t, stable=True)
    order = order[torch.argsort(pair_d2[order], stable=True)]
    order = order[torch.argsort(pair_q[order], stable=True)]
    q_all, t_all, d_all = pair_q[order], pair_t[order], pair_d2[order]
    counts = torch.bincount(q_all, minlength=num_queries)
    rank = torch.arange(len(q_all), device=device) - (torch.cumsum(counts, 0) - counts)[q_all]
    top = rank < k
    d2 = torch.full((num_queries, k), torch.inf, dtype=torch.float64, device=device)
    idx = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    d2[q_all[top], rank[top]] = d_all[top]
    idx[q_all[top], rank[top]] = t_all[top]
    return d2, idx
