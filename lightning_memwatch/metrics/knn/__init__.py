"""Exact k-nearest-neighbour search of generated samples in the training set (L2 distance).

:class:`NearestNeighbourIndex` is built once over the training set and answers, for every query (a generated
sample), its ``k`` nearest training rows and their true (not squared) Euclidean distances. It is the engine of
the memorization ratio ``d1 / d2`` in :mod:`lightning_memwatch.metrics.memorization`. Its sharded sibling for
a process group is :class:`lightning_memwatch.metrics.knn_sharded.ShardedNearestNeighbourIndex`.

The package, by job:

* :mod:`.rows`: row sources (held in memory, a numpy memmap, a map-style Dataset);
* :mod:`.build`: the build (duplicate hashing, centre, norms);
* :mod:`.bounds`: the rounding-error bounds of the fast passes, with their derivation;
* :mod:`.scan`: the fast passes (float32 GEMM, faiss, split-bfloat16 screen, float64), one scan per search;
* :mod:`.int8`: the int8 screen (exact integer GEMMs, a certificate from each row's quantization residual);
* :mod:`.exact`: the exact re-ranking of the candidates;
* :mod:`.backends`: the ``"auto"`` rule; :mod:`.index`: the index itself.

Decisions, in one place:

* **Exact, and certified, in one scan.** Every pass computes, for every (query, training row) pair, a lower
  and an upper bound on the squared distance (a fast approximation plus or minus a rigorous bound on its
  rounding error, per query *and per row*: it grows with the row's own norm, not the longest row's; see
  :mod:`.bounds`). While it scans the training set once, block by block, it keeps the ``k`` smallest upper
  bounds seen (their largest, the running threshold, is at least the true ``k``-th distance) and every row
  whose lower bound does not exceed the threshold. Those candidates get exact distances from the original
  float32 rows with float64 differences. Results are those of float64 arithmetic on the float32 rows: an
  exact copy of a training row has distance exactly 0, nearly tied neighbours are never silently swapped,
  and exact ties go to the lower row index. Near-tie-dense data (many rows within the bound of the ``k``-th
  neighbour, e.g. images with large saturated regions) cost more candidates, never another scan. Only queries
  or rows with values float32 cannot hold (``(||q|| + max ||t||)^2 >= 2**120``, e.g. 1e20) go through a
  second, float64 scan. :attr:`NearestNeighbourIndex.last_search` (a :class:`SearchStats`) reports the work.
* **int8 screening** (``backend="torch-int8"``, CPU). Rows and queries are stored as 8-bit codes on one
  scale; the integer GEMM of the codes is exact, and each distance is bracketed by the code distance plus or
  minus the two vectors' quantization residuals (known per row at build time, per query at search time), a
  bound with no rounding term (see :mod:`.int8`). ``"auto"`` picks it on CPUs with int8 dot-product
  instructions (``avx512_vnni``, ``avx_vnni``, ``amx_int8``: :func:`has_fast_int8`), where torch's int8 GEMM
  runs several times faster than its float32 GEMM (on AVX2 alone it is exact for 7-bit codes only: forced
  there, the screen uses them); queries the codes cannot narrow take the float32 tile on
  the block in hand (no second scan). It keeps an int8 copy of held rows (``D`` bytes per row, a quarter of
  the float32 rows).
* **Split-bfloat16 screening** (``backend="torch-bf16"``). Each centred row is split into two bfloat16 parts
  and one bfloat16 GEMM of inner dimension ``3 D + 6`` (padded to 32) computes ``-d^2 / 2`` directly, so its
  rounding to bfloat16 is relative to the distance, not to the norms. It assumes products exact in float32,
  float32 accumulation and one rounding of the result (AMX, AVX512-BF16, oneDNN; cuBLAS with tensor cores,
  where torch returns the float32 accumulator and the accumulation unit is taken 4x larger, see
  :mod:`.bounds`). ``"auto"`` picks it on CPUs that report ``amx_bf16`` and on CUDA devices of compute
  capability 8.0 and later (:func:`has_fast_bfloat16`); it keeps a bfloat16 screening copy of held rows (1.5x
  the float32 rows) unless ``screen_copy=False``.
* **Offsets.** When centring removes at least half of the rows' squared norms (images in [0, 1], anything far
  from the origin), both rows and queries are centred on the float32 training mean for the fast passes (block
  by block, one reused buffer): the bounds grow with the centred norms. Exact distances always use the
  original rows.
* **Exact duplicates** in the training set would make ``d2 = 0`` for a copy of them. They are removed at build
  time (``dedupe=True``, with a warning), found by a 64-bit hash of each row's bits and confirmed by exact
  comparison; returned indices point to the first original row of each group. With ``dedupe=False``
  duplicates are kept and the memorization ratio defines ``0 / 0 = 0``.
* **Training sets beyond memory.** A numpy array opened with ``np.load(path, mmap_mode="r")`` (a
  ``np.memmap``) or a map-style ``Dataset`` is never copied: the build and every search read it in database
  blocks, and the exact re-ranking reads only the candidate rows.
* **Memory** (resident, ``n`` rows of ``D`` float32 values): held rows ``4 n D`` bytes plus ``20 n`` bytes of
  norms and bias; ``torch-int8`` adds its codes, ``n`` rows of ``D`` padded to a multiple of 8 bytes, and
  ``14 n`` bytes of code norms, residuals and row masks (``screen_copy=False`` or streamed rows: codes made
  block by block);
  ``torch-bf16`` adds its screening copy, ``2 n (3 D + 6)`` bytes rounded up to 32 columns
  (none with ``screen_copy=False`` or streamed rows); streamed rows hold only the ``20 n`` bytes. A search
  adds one tile of ``block_size x database_block_size`` scores, one centred block, and its candidates. No
  ``m x n`` distance matrix is ever built.
* **Backends.** ``"auto"`` takes ``torch-int8`` where :func:`has_fast_int8` (rows of at most 32,768 values),
  else ``torch-bf16`` where :func:`has_fast_bfloat16`, faiss on the GPU when faiss
  sees GPUs and the training data are on CUDA, faiss on the CPU for other CPU data, and the blocked torch
  matmul (any device torch supports) when faiss is not installed. Each can be forced with ``backend=``.
"""

from __future__ import annotations

from lightning_memwatch.metrics.knn.backends import (
    BACKENDS,
    Backend,
    available_backends,
    has_fast_bfloat16,
    has_fast_int8,
)
from lightning_memwatch.metrics.knn.backends import faiss_num_gpus as _faiss_num_gpus  # noqa: F401
from lightning_memwatch.metrics.knn.backends import import_faiss as _import_faiss  # noqa: F401
from lightning_memwatch.metrics.knn.index import NearestNeighbourIndex, SearchStats

__all__ = [
    "BACKENDS",
    "Backend",
    "NearestNeighbourIndex",
    "SearchStats",
    "available_backends",
    "has_fast_bfloat16",
    "has_fast_int8",
]

# `_faiss_num_gpus` and `_import_faiss`: the former private names, which lightning_memwatch.install_check reads.
