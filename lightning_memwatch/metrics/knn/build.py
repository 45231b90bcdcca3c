"""The build: exact duplicates (row hashes, confirmed by comparison), the centre, and the norms of the rows.

The centre candidate is the mean of up to 4,096 evenly spaced rows (any centre keeps the search exact, a good
one keeps its bounds small); the index centres when that removes at least half of the sampled rows' squared
norms (:func:`centring_pays`). Then one pass over the rows, in cache-sized blocks (numpy, one thread per torch
thread), hashes every row's bits, takes the float64 squared norms of the rows as the fast passes see them
(centred or not), and does the caller's own work on each block while it is in cache (``on_block``: the int8
codes of :mod:`.int8`). No float64 copy of the data is made.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch.metrics.knn.rows import HeldRows, source_device

__all__ = [
    "RowStats",
    "centre_of",
    "centring_pays",
    "duplicate_groups",
    "duplicate_mask",
    "row_hashes",
    "row_stats",
    "sample_rows",
    "ThreadScratch",
]

# Bytes of float32 rows per block of the build passes (stays in cache with its temporaries).
BUILD_BLOCK_BYTES = 2 * 2**20
_HASH_SEED = 0x6D656D77
# Rows (evenly spaced) whose mean is the centre candidate: any float32 centre keeps the search exact.
CENTRE_SAMPLE = 4096
# Share of the sampled rows' squared norms that centring must remove for the index to centre (images in [0, 1]:
# about 3/4 of it goes): the bounds grow with the norms.
CENTRE_GAIN = 0.5


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
    # einsum: the products summed without a temporary (integer sums wrap, in any order)
    if rows.shape[1] % 2 == 0:
        words = out.view(np.uint64)
        h = np.einsum("ij,j->i", words, _hash_coefficients(words.shape[1], 64))
    else:
        words = out.view(np.uint32)
        h = np.einsum("ij,j->i", words, _hash_coefficients(words.shape[1], 32)).astype(np.uint64)
    return h.view(np.int64)


@dataclass
class RowStats:
    """What the build pass learns about the rows.

    Attributes:
        hashes: int64 hash of every row (None when not asked for).
        sq_norms: float64 squared norm of every row, or of every ``fl32(row - centre)`` when centred.
    """

    hashes: Tensor | None
    sq_norms: Tensor


def sample_rows(source: HeldRows, device: torch.device) -> Tensor:
    """Up to :data:`CENTRE_SAMPLE` evenly spaced rows of ``source`` (float32, on ``device``)."""
    rows = torch.linspace(0, source.n - 1, min(source.n, CENTRE_SAMPLE)).round().long().unique()
    return source.gather(rows.to(source_device(source))).to(device, torch.float32)


def centre_of(sample: Tensor) -> Tensor:
    """The centre candidate: the float64 mean of the sampled rows, rounded to float32."""
    return sample.to(torch.float64).mean(dim=0).to(torch.float32)


def centring_pays(sample: Tensor, centre: Tensor) -> bool:
    """Whether centring on ``centre`` removes at least :data:`CENTRE_GAIN` of the sampled rows' squared norms
    (float64 sums; the bounds of the fast passes grow with the norms)."""
    raw = float(sample.to(torch.float64).square().sum())
    centred = float((sample - centre).to(torch.float64).square().sum())
    return centred < (1 - CENTRE_GAIN) * raw


class ThreadScratch(threading.local):
    """One thread's numpy buffers, by name, reused from block to block: temporaries of a few MiB allocated and
    freed at every block cost page faults (glibc hands them back to the system and they come back zeroed), which
    made the build's norms 5x slower than their arithmetic."""

    def get(self, name: str, rows: int, dim: int, dtype: type) -> np.ndarray:
        """A ``(rows, dim)`` buffer of ``dtype`` (a view of this thread's buffer ``name``, grown when short)."""
        buf = self.__dict__.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != dim or buf.dtype != dtype:
            buf = np.empty((rows, dim), dtype=dtype)
            setattr(self, name, buf)
        return buf[:rows]


def _numpy_block(
    block: np.ndarray, centre: np.ndarray | None, hashes: bool, scratch: ThreadScratch
) -> tuple[np.ndarray | None, np.ndarray]:
    """Hash and squared norm (of the row, or of its float32 difference from ``centre``) of each row of one float32
    block (numpy, GIL released)."""
    f32, f64 = scratch.get("f32", *block.shape, np.float32), scratch.get("f64", *block.shape, np.float64)
    h = hash_block(block, f32) if hashes else None
    # the float32 difference, as the centred passes see it
    np.copyto(f64, block if centre is None else np.subtract(block, centre, out=f32))
    return h, np.einsum("ij,ij->i", f64, f64)


def row_stats(
    source: HeldRows,
    device: torch.device,
    *,
    hashes: bool,
    copy_to: Tensor | None = None,
    centre: Tensor | None = None,
    on_block: Callable[[int, Tensor], None] | None = None,
) -> RowStats:
    """Hashes and squared norms of every row, in one pass over the rows.

    On CPU the blocks are processed by numpy in ``torch.get_num_threads()`` threads (numpy releases the GIL);
    elsewhere by torch on the device (hashes on the CPU). ``centre``: the norms are those of ``fl32(row -
    centre)`` (None: of the rows). ``copy_to``: a ``(n, D)`` float32 tensor that receives a copy of the rows in
    the same pass (the index's own copy, written while each block is in cache). ``on_block(start, rows)``: more
    work on each block in the same pass (the int8 codes), called from the worker threads.
    """
    step = build_block(source.dim)
    starts = range(0, source.n, step)
    if device.type == "cpu":
        centre_np = centre.numpy() if centre is not None else None
        target = copy_to.numpy() if copy_to is not None else None
        scratch = ThreadScratch()

        def work(j: int) -> tuple[np.ndarray | None, np.ndarray]:
            block = source.block(j, min(j + step, source.n), device).numpy()
            if target is not None:
                target[j : j + len(block)] = block
            if on_block is not None:
                on_block(j, torch.from_numpy(block))
            return _numpy_block(block, centre_np, hashes, scratch)

        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            parts = list(pool.map(work, starts))
        found = [torch.from_numpy(p[0]) for p in parts if p[0] is not None]
        norms = [torch.from_numpy(p[1]) for p in parts]
    else:
        found, norms = [], []
        for j in starts:
            block = source.block(j, min(j + step, source.n), device).to(device)
            if copy_to is not None:
                copy_to[j : j + len(block)] = block
            if on_block is not None:
                on_block(j, block)
            if hashes:
                found.append(torch.from_numpy(hash_block(block.cpu().numpy())))
            shifted = block if centre is None else block - centre
            norms.append(torch.linalg.vector_norm(shifted, dim=1, dtype=torch.float64).square_())
    empty = torch.empty(0, dtype=torch.float64, device=device)
    return RowStats(
        hashes=(torch.cat(found) if found else torch.empty(0, dtype=torch.int64)) if hashes else None,
        sq_norms=torch.cat(norms).to(device) if norms else empty,
    )


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
    h = hashes.numpy()
    ordered = np.sort(h)  # (numpy: torch.unique on CPU took seconds at 10^6 rows)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(repeated) == 0:
        return dropped
    suspects = torch.from_numpy(np.isin(h, repeated).nonzero()[0]).to(torch.int64)
    rows = fetch(suspects).cpu() + 0.0  # -0.0 as 0.0, as the hash
    _, groups = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(groups.max()) + 1,), len(hashes), dtype=torch.int64)
    first = first.scatter_reduce(0, groups, suspects, reduce="amin")
    dropped[suspects] = first[groups] != suspects
    return dropped


def duplicate_mask(hashes: Tensor, source: HeldRows) -> Tensor:
    """Mask of the rows of ``source`` that exactly equal an earlier row."""
    return duplicate_groups(hashes, lambda rows: source.gather(rows.to(source_device(source))))
