"""Exact k-nearest-neighbour search over a training set sharded across a ``torch.distributed`` process group.

Each rank holds a contiguous block of the training rows (rank 0 the first ones, shards may be uneven, a rank
may hold none); every rank searches all the queries (the same on every rank, e.g. the gathered samples)
against its shard with a :class:`~lightning_memwatch.metrics.knn.NearestNeighbourIndex`, whose results are
exact and certified per shard; the per-rank top-``k`` lists (exact float64 squared distances and global row
numbers) are all-gathered and merged by (distance, row). The global nearest neighbours are therefore those of
one process's index over the concatenated shards, ties going to the lower global row. Exact duplicates are
removed across shards (the first global copy is kept), as one process's index does. Memory per rank: its
shard plus ``O(block)``; time per rank proportional to its shard's rows.

Every method is a collective: all ranks of the group call it, in the same order.

This module is the distributed half of :mod:`lightning_memwatch.metrics.knn` and uses that package's public
pieces: :meth:`NearestNeighbourIndex.search_squared` (exact float64 squared distances), the index's
``row_source``, and :mod:`~lightning_memwatch.metrics.knn.build`'s row hashes and duplicate groups: what each
shard must share exactly with the single-process index for the merged result to equal it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_memwatch._checks import check_batch, config_error
from lightning_memwatch.metrics.knn import Backend, NearestNeighbourIndex
from lightning_memwatch.metrics.knn.backends import resolve_backend
from lightning_memwatch.metrics.knn.build import duplicate_groups, row_hashes
from lightning_memwatch.metrics.knn.rows import source_device

__all__ = ["ShardedNearestNeighbourIndex"]


class ShardedNearestNeighbourIndex:
    """Exact L2 k-nearest-neighbour index whose training rows are split across the ranks of a process group.

    Args:
        shard: this rank's contiguous block of training images, ``(n_rank, ...)`` (``n_rank`` may be 0: pass an
            empty tensor with the per-sample shape); global row numbers follow rank order. A tensor, a float32
            memmap or a Dataset, as for :class:`NearestNeighbourIndex`.
        group: the process group (default: the world). It must be initialised.
        backend, feature_fn, dedupe, block_size, database_block_size: as for :class:`NearestNeighbourIndex`.

    Attributes:
        num_train: distinct rows over all shards. offset: global row number of this rank's first row.
        shard_rows: this rank's rows (before removing duplicates). world_size, rank: of ``group``.
    """

    def __init__(
        self,
        shard: Tensor | np.ndarray | Any | None,
        *,
        group: Any | None = None,
        backend: Backend = "auto",
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        dedupe: bool = True,
        block_size: int | None = None,
        database_block_size: int | None = None,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ShardedNearestNeighbourIndex needs an initialised torch.distributed process group "
                "(`torch.distributed.init_process_group`); in one process, use NearestNeighbourIndex."
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._comm_device = torch.device("cuda", torch.cuda.current_device()) if _is_nccl(group) else None
        problem = ""
        if shard is None:
            problem = (
                f"rank {self.rank} joined with no training data (None): pass its block of rows, or an empty tensor "
                "of shape (0, *sample_shape) for a rank that holds none"
            )
        local: NearestNeighbourIndex | None = None
        shape: tuple[int, ...] = ()
        if not problem:
            empty = len(shard) == 0  # type: ignore[arg-type]
            try:
                if empty:
                    shape = tuple(shard.shape[1:])  # type: ignore[union-attr]
                else:
                    local = NearestNeighbourIndex(
                        shard,
                        backend=backend,
                        feature_fn=feature_fn,
                        dedupe=False,
                        block_size=block_size,
                        database_block_size=database_block_size,
                        _min_rows=0,
                    )
                    shape = local.sample_shape
            except (TypeError, ValueError) as err:
                problem = f"rank {self.rank}: {err}"
        n_local = 0 if local is None else local.num_rows
        dim = -1 if local is None else local.dim
        # One metadata exchange, so that a problem on one rank raises on every rank (no rank hangs).
        meta = self._all_gather_object((problem, n_local, dim, shape))
        problems = [p for p, *_ in meta if p]
        if problems:
            raise config_error("ShardedNearestNeighbourIndex: " + "; ".join(problems))
        dims = {d for _, n, d, _ in meta if n > 0}
        shapes = {s for _, n, _, s in meta if n > 0} | {s for _, n, _, s in meta if n == 0 and s}
        if len(dims) > 1 or (feature_fn is None and len(shapes) > 1):
            raise config_error(
                "the shards have different dimensions/shapes: "
                + ", ".join(f"rank {r}: {n} rows of shape {s} (dimension {d})" for r, (_, n, d, s) in enumerate(meta))
                + ". Every rank must pass rows of the same per-sample shape."
            )
        if not dims:
            raise config_error("every shard is empty: the training set has no rows.")
        counts = [n for _, n, _, _ in meta]
        self.dim = dims.pop()
        self.sample_shape = next(s for _, n, _, s in meta if n > 0)
        self.offset = sum(counts[: self.rank])
        self.shard_rows = n_local
        self.feature_fn = feature_fn
        self._local = local
        self._ids: Tensor | None = None  # global row of each local index row, when rows were dropped
        self.num_duplicates = 0
        if dedupe:
            self._drop_global_duplicates(counts)
        total = self._all_gather_object(0 if self._local is None else self._local.num_train)
        self.num_train = sum(total)
        if self.num_train < 2:
            raise config_error(
                f"the shards hold {self.num_train} distinct rows in all, but the memorization ratio compares the "
                "nearest and second-nearest training examples: pass at least 2 distinct examples."
            )
        self.backend = (
            self._local.backend if self._local is not None else resolve_backend(backend, torch.device("cpu"))[0]
        )
        self.device = self._local.device if self._local is not None else torch.device("cpu")

    # ------------------------------------------------------------------------------------------ plumbing
    def _all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _drop_global_duplicates(self, counts: list[int]) -> None:
        """Drop rows that exactly equal an earlier global row (on any rank); the first copy stays."""
        local = self._local
        hashes = row_hashes(local.row_source, local.device) if local is not None else torch.empty(0, dtype=torch.int64)
        all_hashes = torch.cat(self._all_gather_object(hashes))
        lo, hi = self.offset, self.offset + self.shard_rows

        def fetch(rows: Tensor) -> Tensor:
            # every rank sends its suspect rows; every rank then groups the same union
            own = [int(r) for r in rows if lo <= int(r) < hi]
            payload = (
                local.row_source.gather(torch.tensor(own, dtype=torch.int64) - self.offset).cpu()
                if own and local is not None
                else torch.empty(0, self.dim)
            )
            parts = self._all_gather_object((own, payload))
            by_row = {r: row for ids, rows_ in parts for r, row in zip(ids, rows_)}
            return torch.stack([by_row[int(r)] for r in rows])

        dropped = duplicate_groups(all_hashes, fetch)
        self.num_duplicates = int(dropped.sum())
        mine_dropped = dropped[self.offset : self.offset + self.shard_rows]
        if self.num_duplicates and self.rank == 0:
            warnings.warn(
                f"train holds {self.num_duplicates} exact duplicate rows (of {sum(counts)}, across all shards); they "
                "were removed from the nearest-neighbour index (a duplicate would make d2 = 0). Returned indices "
                "point to the first copy. Pass dedupe=False to keep them.",
                UserWarning,
                stacklevel=3,
            )
        if local is not None and bool(mine_dropped.any()):
            keep = (~mine_dropped).nonzero().flatten()
            if len(keep) == 0:
                self._local = None
                return
            rows = local.row_source.gather(keep.to(source_device(local.row_source)))
            if self.feature_fn is None:
                rows = rows.reshape(len(rows), *self.sample_shape)
            self._local = NearestNeighbourIndex(
                rows,
                backend=local.backend,  # type: ignore[arg-type]
                dedupe=False,
                block_size=local.block_size,
                database_block_size=local.database_block_size,
                _min_rows=0,
            )
            self._local.feature_fn = None  # rows are already features
            self._ids = keep

    # ------------------------------------------------------------------------------------------ search
    def search(self, queries: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest training rows (over all shards) of each query, nearest first. Collective.

        Args:
            queries: ``(m, ...)``, the same on every rank (e.g. samples all-gathered in index order).
            k: neighbours per query, ``1 <= k <= num_train``.

        Returns:
            ``(distances, indices)``, both ``(m, k)``: true L2 distances (float32, ascending, ties by lower
            global row) and int64 global row indices (rank order), identical on every rank.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            raise config_error(f"k must be an int in [1, num_train={self.num_train}]; got {k!r}.")
        m = len(queries)
        sizes = self._all_gather_object(m)
        if len(set(sizes)) > 1:
            raise config_error(
                f"every rank must search the same queries; got {sizes} rows on ranks 0..{len(sizes) - 1}."
            )
        device = self._comm_device or torch.device("cpu")
        if self._local is not None:
            q = self._prepare(queries)
            d2, idx = self._local.search_squared(q, k)
            if self._ids is not None:
                idx = torch.where(idx >= 0, self._ids.to(idx.device)[idx.clamp_min(0)], idx)
            idx = torch.where(idx >= 0, idx + self.offset, idx)
        else:
            check_batch(queries, "queries")
            d2 = torch.full((m, k), torch.inf, dtype=torch.float64)
            idx = torch.full((m, k), -1, dtype=torch.int64)
        d2, idx = d2.to(device), idx.to(device)
        all_d2 = [torch.empty_like(d2) for _ in range(self.world_size)]
        all_idx = [torch.empty_like(idx) for _ in range(self.world_size)]
        dist.all_gather(all_d2, d2, group=self.group)
        dist.all_gather(all_idx, idx, group=self.group)
        d2_all, idx_all = torch.cat(all_d2, dim=1), torch.cat(all_idx, dim=1)
        missing = idx_all < 0
        idx_key = torch.where(missing, torch.iinfo(torch.int64).max, idx_all)
        order = torch.argsort(idx_key, dim=1, stable=True)
        order = torch.gather(order, 1, torch.argsort(torch.gather(d2_all, 1, order), dim=1, stable=True))
        best_d2 = torch.gather(d2_all, 1, order)[:, :k]
        best_idx = torch.gather(idx_all, 1, order)[:, :k]
        out_device = self.device if self._local is not None else queries.device
        return best_d2.sqrt().to(torch.float32).to(out_device), best_idx.to(out_device)

    def _prepare(self, queries: Tensor) -> Tensor:
        assert self._local is not None
        if self.feature_fn is None:
            return self._local.prepare_queries(queries)
        # the local index of re-built shards holds features: apply feature_fn here
        local = self._local
        if local.feature_fn is None:
            feats = self.feature_fn(queries.to(local.device))
            return check_batch(feats, "feature_fn(queries)").reshape(len(feats), -1).float()
        return local.prepare_queries(queries)

    def train_images(self, indices: Tensor) -> Tensor:
        """Training images of global row ``indices`` (as :meth:`search` returns them), on every rank. Collective."""
        if self.feature_fn is not None:
            raise config_error("this index holds feature_fn features, not images: keep the images yourself.")
        flat = indices.reshape(-1).cpu().long()
        mask = (flat >= self.offset) & (flat < self.offset + self.shard_rows)
        mine = flat[mask]
        rows = torch.empty(0, *self.sample_shape)
        if len(mine) and self._local is not None:
            local_pos = mine - self.offset
            if self._ids is not None:
                local_pos = torch.searchsorted(self._ids, local_pos)
            rows = self._local.row_source.gather(local_pos.to(source_device(self._local.row_source))).cpu()
            rows = rows.reshape(len(mine), *self.sample_shape)
        parts = self._all_gather_object((mask.nonzero().flatten(), rows))
        out = torch.empty(len(flat), *self.sample_shape)
        for pos, part in parts:
            out[pos] = part
        return out.reshape(*indices.shape, *self.sample_shape)


def _is_nccl(group: Any | None) -> bool:
    try:
        return dist.get_backend(group) == "nccl"
    except Exception:  # pragma: no cover
        return False
