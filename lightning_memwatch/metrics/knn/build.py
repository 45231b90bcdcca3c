"""The build: exact duplicates (row hashes, confirmed by comparison), the centre, and the norms of the rows.

One pass over the rows, in cache-sized blocks, hashes every row's bits, sums the columns (float64) and takes
the float64 squared norms; a second pass, only when the index centres, takes the norms of the centred float32
rows. No float64 copy of the data is made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch.metrics.knn.rows import HeldRows, source_device

__all__ = ["RowStats", "duplicate_groups", "duplicate_mask", "row_hashes", "row_stats", "centred_sq_norms"]

# Bytes of float32 rows per block of the build passes (stays in cache with its temporaries).
BUILD_BLOCK_BYTES = 2 * 2**20
_HASH_SEED = 0x6D656D77


def build_block(dim: int) -> int:
    """Rows per block of the build passes."""
    return max(1, BUILD_BLOCK_BYTES // (4 * max(dim, 1)))


@functools.lru_cache(maxsize=8)
def _hash_coefficients(words: int, bits: int) -> np.ndarray:
    g = np.random.default_rng(_HASH_SEED)
    dtype = np.uint64 if bits == 64 else np.uint32
    return (g.integers(0, 2**bits, size=words, dtype=dtype) | dtype(1)).astype(dtype)


def hash_block(rows: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """64-bit hash (``int64``) of each float32 row's bits (``-0.0`` as ``0.0``); wraps modulo 2**64, any order.

    Pairs of float32 words are read as one 64-bit word (one uint32 word per value for odd dimensions, whose
    hash is then 32 bits wide); equal rows always hash equal, and collisions are resolved by exact comparison.
    """
    out = np.add(rows, 0.0, out=scratch[: len(rows)] if scratch is not None else None, dtype=np.float32)
    if rows.shape[1] % 2 == 0:
        words = out.view(np.uint64)
        h = (words * _hash_coefficients(words.shape[1], 64)).sum(axis=1, dtype=np.uint64)
    else:
        words = out.view(np.uint32)
        h = (words * _hash_coefficients(words.shape[1], 32)).sum(axis=1, dtype=np.uint32).astype(np.uint64)
    return h.view(np.int64)


@dataclass
class RowStats:
    """What the first build pass learns: row hashes (or None), the float64 column mean, the raw squared norms."""

    hashes: Tensor | None
    mean: Tensor
    sq_norms: Tensor


def row_stats(source: HeldRows, device: torch.device, *, hashes: bool) -> RowStats:
    """Hashes, float64 column mean and float64 squared norms of every row, in one pass over the rows."""
    step = build_block(source.dim)
    total = torch.zeros(source.dim, dtype=torch.float64, device=device)
    norms, found = [], []
    scratch = np.empty((step, source.dim), dtype=np.float32) if hashes else None
    for j in range(0, source.n, step):
        block = source.block(j, min(j + step, source.n), device).to(device)
        if hashes:
            found.append(torch.from_numpy(hash_block(block.cpu().numpy(), scratch)))
        total += block.sum(dim=0, dtype=torch.float64)
        norms.append(torch.linalg.vector_norm(block, dim=1, dtype=torch.float64).square_())
    sq = torch.cat(norms) if norms else torch.empty(0, dtype=torch.float64, device=device)
    return RowStats(
        hashes=(torch.cat(found) if found else torch.empty(0, dtype=torch.int64)) if hashes else None,
        mean=total / max(source.n, 1),
        sq_norms=sq,
    )


def centred_sq_norms(source: HeldRows, device: torch.device, centre: Tensor) -> Tensor:
    """float64 squared norms of the float32 rows ``fl32(rows - centre)`` (as the centred fast passes see them)."""
    step = build_block(source.dim)
    buffer = torch.empty(min(step, source.n), source.dim, device=device)
    parts = []
    for j in range(0, source.n, step):
        block = source.block(j, min(j + step, source.n), device).to(device)
        diff = torch.sub(block, centre, out=buffer[: len(block)])
        parts.append(torch.linalg.vector_norm(diff, dim=1, dtype=torch.float64).square_())
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=device)


def row_hashes(source: HeldRows, device: torch.device) -> Tensor:
    """int64 hash of every row of ``source`` (CPU tensor), as :func:`hash_block` defines it."""
    hashes = row_stats(source, device, hashes=True).hashes
    assert hashes is not None
    return hashes


def duplicate_groups(hashes: Tensor, fetch: Callable[[Tensor], Tensor]) -> Tensor:
    """Mask of rows that exactly equal an earlier row (by number).

    Args:
        hashes: one per row.
        fetch: ``fetch(rows)`` returns those rows (float32, ``(len, D)``) for exact confirmation of collisions.
    """
    dropped = torch.zeros(len(hashes), dtype=torch.bool)
    if len(hashes) < 2:
        return dropped
    _, inverse, counts = torch.unique(hashes, return_inverse=True, return_counts=True)
    suspects = (counts[inverse] > 1).nonzero().flatten()
    if len(suspects) == 0:
        return dropped
    rows = fetch(suspects).cpu() + 0.0  # -0.0 as 0.0, as the hash
    _, groups = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(groups.max()) + 1,), len(hashes), dtype=torch.int64)
    first = first.scatter_reduce(0, groups, suspects, reduce="amin")
    dropped[suspects] = first[groups] != suspects
    return dropped


def duplicate_mask(hashes: Tensor, source: HeldRows) -> Tensor:
    """Mask of the rows of ``source`` that exactly equal an earlier row."""
    return duplicate_groups(hashes, lambda rows: source.gather(rows.to(source_device(source))))
