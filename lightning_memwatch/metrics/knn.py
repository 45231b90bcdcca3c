"""Exact k-nearest-neighbour search of generated samples in the training set (L2 distance).

:class:`NearestNeighbourIndex` is built once over the training set and answers, for every query (a generated
sample), its ``k`` nearest training rows and their true (not squared) Euclidean distances. It is the engine of
the memorization ratio ``d1 / d2`` in :mod:`lightning_memwatch.metrics.memorization`. Its sharded sibling for
a process group is :class:`lightning_memwatch.metrics.knn_sharded.ShardedNearestNeighbourIndex`.

Decisions, in one place:

* **Exact, and certified.** Every backend first finds ``k + slack`` candidate neighbours with fast arithmetic
  (a float32 GEMM on ``||t||^2 - 2 q.t``, faiss, which uses the same expansion, or a split-bfloat16 GEMM, see
  below). That expansion loses precision when two points are much closer than their norms, so the
  candidates' distances are then recomputed from the original float32 rows with float64 differences, and
  re-ranked. A rigorous bound on the rounding error of the fast pass, ``1.25 (D + 8) 2**-24 (||q|| + max
  ||t||)**2`` for float32 (widened when TF32/bfloat16 matmuls are enabled), then certifies, row by row, that
  no training row outside the candidates can be closer than the k-th neighbour found. A bound or a distance
  that is not finite (e.g. a query of 1e20, whose square overflows float32) never certifies. Rows that cannot
  be certified (near-ties at the boundary) are searched again: every training row whose approximate distance
  is within the bound of the k-th exact one gets an exact distance (``num_fallback`` counts these rows; a
  row whose bound is not finite gets exact distances to every training row). Results are therefore those of
  float64 arithmetic on the float32 rows: an exact copy of a training row has distance exactly 0, nearly tied
  neighbours are never silently swapped, and exact ties go to the lower row index.
* **Split-bfloat16 screening** (``backend="torch-bf16"``). Each centred row ``x`` is split into two bfloat16
  parts, ``x ~ hi + lo`` (16 significant bits), and one bfloat16 GEMM of inner dimension ``3 D + 16``
  computes ``hi_q.hi_t + hi_q.lo_t + lo_q.hi_t - ||t||^2 / 2 - ||q||^2 / 2``, i.e. ``-d^2 / 2`` directly, so
  that its single rounding to bfloat16 is relative to the distance, not to the norms. The bound on its error,
  per query and per candidate, is ``2 (2**-8 |out| + E)`` with ``E = 1.25 [3.1 2**-16 ||q|| M + gamma_K
  1.03 (||q|| + M)^2 / 2 + 4 2**-24 (||q|| + M)^2]`` (``M = max ||t||``, ``gamma_K = K 2**-24 / (1 - K
  2**-24)``); it assumes what AMX, AVX512-BF16 and oneDNN do: products exact in float32, float32
  accumulation, one rounding to nearest of the result. Rows the screen cannot certify go through the float32
  path above, so results are the same as with ``backend="torch"``. It pays where bfloat16 GEMMs run much
  faster than float32 ones (AMX: about 8x on the 2-core Xeon of the benchmarks); ``"auto"`` picks it on CPUs
  that report ``amx_bf16`` (documented rule, :func:`has_fast_bfloat16`). It keeps a bfloat16 screening copy of
  the rows (1.5x the float32 rows) unless the rows are streamed.
* **Offsets.** When the data share a common offset larger than their spread (e.g. images in [0, 1], or
  anything far from the origin), the raw expansion's bound grows with the offset. For a moderate offset (the
  longest raw row at most 4 times the longest centred one, as for images) no row is centred during a search:
  the torch pass uses the *offset form* (raw rows against centred queries, with the exact norms of the
  centred rows and a per-query float64 correction, bounded in ``_offset_bound``), and faiss-cpu, which
  computes its own norms of the rows it is given, searches the raw rows with the raw bound up to 8,192
  dimensions (above, that wider bound leaves too many rows uncertified, and it centres). For a larger
  offset the fast pass runs on rows centred on the training mean, block by block (one reused buffer), which
  keeps the bound small. Either way the index holds one float32 copy of the rows, and exact distances always
  use the original rows. Only candidates that can still be among the ``k`` nearest (within twice the bound
  of the k-th approximate distance) get exact distances.
* **Exact duplicates** in the training set would make ``d2 = 0`` for a copy of them. They are removed at build
  time (``dedupe=True``, with a warning), found by a 64-bit hash of each row's bits and confirmed by exact
  comparison; returned indices point to the first original row of each group. With ``dedupe=False``
  duplicates are kept and the memorization ratio defines ``0 / 0 = 0``.
* **Training sets beyond memory.** A numpy array opened with ``np.load(path, mmap_mode="r")`` (a
  ``np.memmap``) or a map-style ``Dataset`` is never copied: the build and every search read it in database
  blocks, and the exact re-ranking reads only the candidate rows. Peak memory is then ``O(block)`` plus the
  queries and ``n`` float64 norms.
* **Memory** of an in-memory index is one float32 copy of the rows (``n x D``, plus ``n`` norms; plus the
  screening copy for ``torch-bf16``) plus one tile of ``block_size x database_block_size`` scores and one
  centred database block. The build peaks at the copy plus ``O(block)`` (no float64 copy of the data). No
  ``m x n`` distance matrix is ever built.
* **Backends.** ``"auto"`` takes ``torch-bf16`` on CPUs with AMX-BF16, faiss on the GPU when faiss sees GPUs
  and the training data are on CUDA, faiss on the CPU for other CPU data, and the blocked torch matmul (any
  device torch supports) when faiss is not installed. Each can be forced with ``backend=``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch._checks import check_batch, check_float_tensor, check_int, config_error, config_type_error

__all__ = ["BACKENDS", "NearestNeighbourIndex", "available_backends", "has_fast_bfloat16"]

Backend = Literal["auto", "faiss-gpu", "faiss-cpu", "torch", "torch-bf16"]
BACKENDS: tuple[str, ...] = ("auto", "faiss-gpu", "faiss-cpu", "torch", "torch-bf16")

# Extra approximate neighbours that are re-ranked with exact distances. With 2, about 0.2% of queries on random
# image-like data (n=32768, D=1024) needed the widened pass (~20-60 ms each time it runs); with 4, none did, for
# a few ms more of re-ranking per 1000 queries.
_CANDIDATE_SLACK = 4
_CANDIDATE_SLACK_HIGH_DIM = 16
# Auto uses the bf16 screen up to this dimension: its bound grows with the 3 D-long sum (see the module notes).
_SCREEN_MAX_AUTO_DIM = 4096
# The split-bf16 screen's bound is wider (its output is rounded to bfloat16): more candidates, same idea.
_SCREEN_SLACK = 8
# Candidates of the second screen, for the rows the first one could not certify.
_SCREEN_WIDE = 64
# Safety factor on the rounding-error bounds.
_BOUND_SAFETY = 1.25
_UNIT_FP32 = 2.0**-24
_UNIT_BF16 = 2.0**-8
# Queries per chunk of the exact re-ranking, and whether CPU re-ranking runs in numpy (see `_exact_sq`).
_RERANK_CHUNK = 64
# ... and at most this many bytes of float64 differences per chunk, so that a chunk stays in cache at any
# dimension (64 queries x 6 candidates at D = 1,024 is 3 MiB; at D = 12,288 with 18 candidates, 2 queries).
_RERANK_BYTES = 4 * 2**20
_NUMPY_ON_CPU = True
# The offset form of the float32 pass (raw rows, centred queries) is used while the longest raw row is at most
# this many times the longest centred row: its bound grows with that ratio (see `_offset_bound`).
_OFFSET_FORM_MAX_RATIO = 4.0
# faiss-cpu searches the raw rows of a moderate offset (its bound then takes the raw norms, about 4x the centred
# bound for images in [0, 1]) only up to this dimension; above it, centred blocks. Measured on a 2-core AMD EPYC
# (m = 500, n = 8,192, 2 threads): at d = 12,288 the raw bound left 64% of uniform queries to the widened pass
# (2.86 s against 2.00 s centred; 1.51 s against 1.25 s on low-rank data, none widened); at d = 1,024-6,144 the
# two were within 10% of each other and neither widened a row.
_FAISS_RAW_MAX_DIM = 8192
# faiss-cpu searches centred or streamed rows in database blocks of at least this many rows.
_FAISS_DB_BLOCK = 4096
# Bytes of scratch per block when hashing rows and computing norms at build time.
_BUILD_SCRATCH = 4 * 2**20


def _import_faiss() -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_num_gpus(faiss: Any | None) -> int:
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - broken GPU driver set-ups
        return 0


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover - not Linux
        pass
    return frozenset()


def has_fast_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether ``backend="auto"`` screens with bfloat16 GEMMs for data on ``device``.

    The rule: a CPU that reports ``amx_bf16`` (Intel Sapphire Rapids and later), where torch's bfloat16 GEMM runs
    several times faster than its float32 GEMM. Elsewhere (AVX-512 without AMX, AMD, GPUs until measured)
    ``"auto"`` keeps the float32 path; ``backend="torch-bf16"`` forces the screen anywhere.
    """
    return torch.device(device).type == "cpu" and "amx_bf16" in _cpu_flags()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable here for data on ``device`` (``"auto"`` excluded), fastest first.

    Args:
        device: where the training data live.

    Returns:
        A sublist of ``["torch-bf16", "faiss-gpu", "faiss-cpu", "torch"]``; ``"torch"`` and ``"torch-bf16"``
        are always present (``"torch-bf16"`` first only where :func:`has_fast_bfloat16`).
    """
    device = torch.device(device)
    faiss = _import_faiss()
    found = ["torch-bf16"] if has_fast_bfloat16(device) else []
    if device.type == "cuda" and _faiss_num_gpus(faiss) > 0:
        found.append("faiss-gpu")
    if faiss is not None:
        found.append("faiss-cpu")
    found.append("torch")
    if "torch-bf16" not in found:
        found.append("torch-bf16")
    return found


def _resolve_backend(backend: str, device: torch.device, *, screen: bool = True) -> tuple[str, torch.device]:
    """The backend actually used and the device the index lives on."""
    if backend not in BACKENDS:
        raise config_error(f"backend must be one of {list(BACKENDS)}; got {backend!r}.")
    faiss = _import_faiss()
    if backend == "auto":
        if screen and has_fast_bfloat16(device):
            return "torch-bf16", device
        if device.type == "cuda" and _faiss_num_gpus(faiss) > 0:
            return "faiss-gpu", device
        if device.type == "cpu" and faiss is not None:
            return "faiss-cpu", device
        return "torch", device
    if backend == "faiss-cpu":
        if faiss is None:
            raise ImportError("backend='faiss-cpu' needs faiss: `pip install faiss-cpu`, or pass backend='torch'.")
        return "faiss-cpu", torch.device("cpu")
    if backend == "faiss-gpu":
        if faiss is None or _faiss_num_gpus(faiss) == 0:
            raise ImportError(
                "backend='faiss-gpu' needs a faiss build with GPU support and a visible CUDA GPU: "
                "`pip install 'lightning-memwatch[gpu]'` (faiss-gpu for CUDA 12), or pass backend='auto'."
            )
        if device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return "faiss-gpu", device
    return backend, device


def _matmul_input_unit(device: torch.device) -> float:
    """Unit roundoff of the *inputs* of a float32 matmul under torch's current precision settings.

    0 for IEEE float32 ("highest"), 2**-11 when TF32 may be used, 2**-8 when bfloat16 may be used.
    """
    unit = {"highest": 0.0, "high": 2.0**-11}.get(torch.get_float32_matmul_precision(), 2.0**-8)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        unit = max(unit, 2.0**-11)
    return unit


# ------------------------------------------------------------------------------------------ row sources
class _Rows:
    """Read access to the training rows as float32 ``(rows, D)``: held in memory or streamed."""

    held = True

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows  # float32, contiguous, owned by the index
        self.n, self.dim = int(rows.shape[0]), int(rows.shape[1])

    def block(self, start: int, stop: int, device: torch.device) -> Tensor:
        return self.rows[start:stop]

    def gather_np(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any shape of int64) as float32, shape ``idx.shape + (D,)``."""
        return self.rows.numpy()[idx]

    def gather(self, idx: Tensor) -> Tensor:
        return self.rows[idx]


class _StreamedRows(_Rows):
    """Rows of a numpy array (e.g. a memmap) or a map-style Dataset, read in blocks, never copied whole."""

    held = False

    def __init__(self, source: Any, n: int, dim: int) -> None:
        self.source, self.n, self.dim = source, n, dim

    def _read(self, idx: Sequence[int] | slice) -> np.ndarray:
        src = self.source
        if isinstance(src, np.ndarray):
            out = src[idx]
            return np.ascontiguousarray(out.reshape(len(out), -1))
        items = range(self.n)[idx] if isinstance(idx, slice) else idx
        return np.stack([_item_image(src[int(i)]).reshape(-1).numpy() for i in items]).astype(np.float32)

    def block(self, start: int, stop: int, device: torch.device) -> Tensor:
        return torch.from_numpy(self._read(slice(start, stop))).to(device)

    def gather_np(self, idx: np.ndarray) -> np.ndarray:
        flat = idx.reshape(-1)
        if isinstance(self.source, np.ndarray) and len(flat) > 1:
            # a memmap reads fastest in row order; undo the sort afterwards
            order = np.argsort(flat, kind="stable")
            rows = np.empty((len(flat), self.dim), dtype=np.float32)
            rows[order] = self._read(flat[order])
        else:
            rows = self._read(flat.tolist()) if len(flat) else np.empty((0, self.dim), np.float32)
        return rows.reshape(*idx.shape, self.dim)

    def gather(self, idx: Tensor) -> Tensor:
        return torch.from_numpy(self.gather_np(idx.cpu().numpy())).to(idx.device)


def _item_image(item: Any) -> Tensor:
    """The image of one Dataset item: the item itself, or the first element of a (image, label, ...) tuple."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    return check_float_tensor(item, "train[i]").detach().cpu().to(torch.float32)


def _as_source(train: Any, name: str) -> tuple[Tensor | None, _StreamedRows | None, tuple[int, ...]]:
    """Either a tensor to copy into memory, or a streamed source; with the per-sample shape."""
    if isinstance(train, Tensor):
        return train, None, tuple(train.shape[1:])
    if isinstance(train, np.memmap) or (isinstance(train, np.ndarray) and not train.flags.owndata):
        if train.dtype != np.float32:
            raise config_type_error(
                f"{name} is a memory-mapped array of dtype {train.dtype}; the index streams float32 rows. "
                f"Save the training set as float32 once (`np.save(path, x.astype(np.float32))`) and open it "
                "with `np.load(path, mmap_mode='r')`."
            )
        if train.ndim < 2 or len(train) < 1:
            raise config_error(f"{name} must be batched, (N, D) or (N, C, H, W); got shape {train.shape}.")
        return None, _StreamedRows(train, len(train), int(np.prod(train.shape[1:]))), tuple(train.shape[1:])
    if isinstance(train, np.ndarray):
        if not np.issubdtype(train.dtype, np.floating):
            raise config_type_error(f"{name} has dtype {train.dtype}; pass floating-point images (e.g. `x / 255`).")
        return torch.from_numpy(train), None, tuple(train.shape[1:])
    if hasattr(train, "__getitem__") and hasattr(train, "__len__"):
        n = len(train)
        if n < 1:
            raise config_error(f"{name} is an empty Dataset.")
        first = _item_image(train[0])
        return None, _StreamedRows(train, n, first.numel()), tuple(first.shape)
    raise config_type_error(
        f"{name} must be a torch.Tensor, a numpy array (e.g. `np.load(path, mmap_mode='r')`) or a map-style "
        f"Dataset of images; got {type(train).__name__}."
    )


# ---------------------------------------------------------------------------------------------- index
class NearestNeighbourIndex:
    """Exact L2 k-nearest-neighbour index over a training set, built once, queried many times.

    Training images ``(n, C, H, W)`` (or any ``(n, ...)``) are flattened to ``(n, D)`` float32 rows, after
    ``feature_fn`` if given. Queries go through the same ``feature_fn`` and flattening, and must have the
    training images' per-sample shape (or, with ``feature_fn``, give features of the training features' shape).

    Args:
        train: training set: an ``(n, ...)`` floating-point tensor (copied once, never modified), a float32
            numpy memmap (``np.load(path, mmap_mode="r")``) or a map-style Dataset of images (both streamed in
            database blocks, never copied whole; not with ``feature_fn``). At least 2 distinct rows.
        backend: ``"auto"`` (default), ``"faiss-gpu"``, ``"faiss-cpu"``, ``"torch"`` or ``"torch-bf16"`` (see
            the module notes).
        feature_fn: optional map from a batch of images to a batch of features, applied to ``train`` at build
            time and to every query batch at search time (under ``torch.no_grad()``). It must be
            deterministic: an exact copy is recognised only if it gets exactly the same features.
        dedupe: remove exact duplicate rows at build time, with a warning (default). Indices returned by
            :meth:`search` always refer to rows of the original ``train``.
        block_size: queries (rows) per block; ``None`` picks 1024 on CPU and 4096 on CUDA.
        database_block_size: training rows per block; ``None`` picks 4096 on CPU and 16384 on CUDA. Peak extra
            memory of a search is about ``4 * block_size * database_block_size`` bytes plus one centred block.

    Attributes:
        num_train: rows in the index (after removing duplicates).
        num_duplicates: rows removed as exact duplicates.
        dim: length of a flattened (feature) row.
        sample_shape: per-sample shape of the training images (queries must match it).
        backend: the backend actually used.
        device: where the index lives; queries elsewhere are copied here.
        streamed: whether the rows are read from ``train`` in blocks instead of held in memory.

    Example:
        >>> train = torch.randn(100, 3, 4, 4)
        >>> index = NearestNeighbourIndex(train, backend="torch")
        >>> distances, indices = index.search(train[:5])
        >>> distances[:, 0].tolist(), indices[:, 0].tolist()
        ([0.0, 0.0, 0.0, 0.0, 0.0], [0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        train: Tensor | np.ndarray | Any,
        *,
        backend: Backend = "auto",
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        dedupe: bool = True,
        block_size: int | None = None,
        database_block_size: int | None = None,
        _min_rows: int = 2,
    ) -> None:
        tensor, streamed, self.sample_shape = _as_source(train, "train")
        if tensor is not None:
            tensor = check_float_tensor(tensor, "train")
            if tensor.ndim >= 2 and _min_rows:
                _check_enough_rows(len(tensor), "train", after_dedupe=False)
            tensor = check_batch(tensor, "train", min_rows=min(_min_rows, 1))
            data_device = tensor.device
        else:
            if feature_fn is not None:
                raise config_error(
                    "feature_fn with a streamed training set (memmap or Dataset) is not supported: compute the "
                    "features once, save them (`np.save`) and index them, or pass the images as a tensor."
                )
            assert streamed is not None
            if _min_rows:
                _check_enough_rows(streamed.n, "train", after_dedupe=False)
            data_device = torch.device("cpu")
        self.backend, self.device = _resolve_backend(backend, data_device)
        cuda = self.device.type == "cuda"
        if block_size is None:
            block_size = 4096 if cuda else 1024
        self.block_size = _positive_int(block_size, "block_size")
        if database_block_size is not None:
            _positive_int(database_block_size, "database_block_size")
        self.database_block_size = 0  # set once the dimension is known
        self.feature_fn = feature_fn
        self._feature_shape: tuple[int, ...] | None = None
        self.streamed = streamed is not None

        with torch.no_grad():
            if tensor is not None:
                rows = self._prepare(tensor.detach(), "train")
                source: _Rows = _Rows(rows)
            else:
                assert streamed is not None
                source = streamed
            self._source = source
            n, self.dim = source.n, source.dim
            if database_block_size is None:  # 4096 rows on CPU (16384 on CUDA), at most ~64 MiB of float32
                database_block_size = max(256, min(16384 if cuda else 4096, 2**24 // max(self.dim, 1)))
            self.database_block_size = database_block_size
            if backend == "auto" and self.backend == "torch-bf16" and self.dim > _SCREEN_MAX_AUTO_DIM:
                self.backend, self.device = _resolve_backend("auto", data_device, screen=False)
            self.num_duplicates = 0
            self._row_ids: Tensor | None = None  # original row of each held row, when rows were dropped
            self._dropped: Tensor | None = None  # streamed rows: mask of dropped duplicates
            if dedupe and n > 1:
                dropped = _duplicate_mask(_row_hashes(source, self.device), source)
                self.num_duplicates = int(dropped.sum())
                if self.num_duplicates:
                    warnings.warn(
                        f"train holds {self.num_duplicates} exact duplicate rows (of {n}); they were "
                        "removed from the nearest-neighbour index (a duplicate would make d2 = 0). Returned "
                        "indices point to the first copy. Pass dedupe=False to keep them.",
                        UserWarning,
                        stacklevel=2,
                    )
                    if source.held:
                        keep = (~dropped).nonzero().flatten()
                        self._row_ids = keep.to(self.device)
                        source = self._source = _Rows(source.rows[keep.to(source.rows.device)])
                    else:
                        self._dropped = dropped
            self.num_train = n - self.num_duplicates
            if _min_rows:
                _check_enough_rows(self.num_train, "train", after_dedupe=True)
            if source.held:
                rows = source.rows
                if tensor is not None and rows.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
                    rows = rows.clone()  # the index owns its rows: later edits of `train` do not reach it
                source = self._source = _Rows(rows.contiguous())
            self._n = source.n  # physical rows (streamed: dropped rows included, masked)
            mean64 = _blocked_mean(source, self.device, self._dropped)
            # The fast pass works on centred rows when a common offset dominates the spread (it would inflate
            # the float32 rounding error); otherwise on the rows themselves.
            self._mean: Tensor | None = None
            norms = _blocked_sq_norms(source, self.device, mean64)
            spread = float(norms.max().sqrt()) if len(norms) else 0.0
            # Offset form of the fast pass (see the module notes): raw rows, centred queries, norms of the
            # centred rows; used while the raw rows are not much longer than the centred ones.
            self._shift_norms64: Tensor | None = None
            self._max_raw_norm = 0.0
            if float(mean64.norm()) > spread:
                self._mean = mean64.to(torch.float32)
                # norms of the rows as the centred pass sees them (rows - mean, rounded to float32), of the
                # exact differences (the offset form), and of the raw rows
                norms, shift_norms, raw_norms = _blocked_offset_norms(source, self.device, self._mean)
                if self._dropped is not None:
                    shift_norms[self._dropped.to(shift_norms.device)] = torch.inf
                    raw_norms[self._dropped.to(raw_norms.device)] = torch.inf
                finite_raw = raw_norms[torch.isfinite(raw_norms)]
                self._max_raw_norm = float(finite_raw.max().sqrt()) if len(finite_raw) else 0.0
                self._raw_norms32 = raw_norms.to(torch.float32)
                # (and only while float32 holds every raw expansion term, (2 max ||t||)^2, with room to spare)
                if self._max_raw_norm <= _OFFSET_FORM_MAX_RATIO * spread and self._max_raw_norm < 2.0**60:
                    self._shift_norms64 = shift_norms
                    self._shift_norms32 = shift_norms.to(torch.float32)
            else:
                norms = _blocked_sq_norms(source, self.device, None)
            if self._dropped is not None:
                norms[self._dropped.to(norms.device)] = torch.inf
            self._norms64 = norms
            self._norms32 = norms.to(torch.float32)
            # rows whose squared norm overflows float32 (|x| > ~1e19) are invisible to float32 passes: then no
            # float32 result certifies, and the widened pass runs in float64
            kept_norms = norms if self._dropped is None else norms[~self._dropped.to(norms.device)]
            self._overflow = bool((~torch.isfinite(kept_norms.to(torch.float32))).any())
            finite = norms[torch.isfinite(norms)]
            self._max_norm = float(finite.max().sqrt()) if len(finite) else 0.0
            self._screen: Tensor | None = None
            if self.backend == "torch-bf16" and source.held and self._n:
                self._screen = torch.empty(self._n, _screen_width(self.dim), dtype=torch.bfloat16, device=self.device)
                step = _build_block(self.dim)  # small blocks: the split makes several temporaries
                for j in range(0, self._n, step):
                    stop = min(j + step, self._n)
                    self._screen[j:stop] = self._screen_rows(j, stop)
        self._attach_faiss()
        # Counters, for tests and benchmarks.
        self.num_searched = 0
        self.num_fallback = 0
        self.num_screen_fallback = 0  # rows screened a second time, with more candidates
        self.num_screen_float32 = 0  # rows neither screen certified: the float32 path

    def _attach_faiss(self) -> None:
        """(Re)create the faiss handles, which are neither picklable nor copyable."""
        self._faiss: Any = None
        self._faiss_res: Any = None
        if self.backend.startswith("faiss"):
            self._faiss = _import_faiss()
            if self._faiss is None:
                raise ImportError(f"this index was built with backend={self.backend!r} but faiss is not installed.")
            if self.backend == "faiss-gpu":
                import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

                self._faiss_res = self._faiss.StandardGpuResources()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_faiss", "_faiss_res"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach_faiss()

    def __repr__(self) -> str:
        return (
            f"NearestNeighbourIndex(num_train={self.num_train}, dim={self.dim}, backend={self.backend!r}, "
            f"device={self.device}, num_duplicates={self.num_duplicates}, streamed={self.streamed})"
        )

    @property
    def holds_images(self) -> bool:
        """Whether :meth:`train_images` can return training images (no ``feature_fn``)."""
        return self.feature_fn is None

    def train_images(self, indices: Tensor) -> Tensor:
        """The training images of the given original row indices (as :meth:`search` returns them).

        Lets a caller (e.g. MemWatch's nearest-image pairs) read images from the index instead of keeping a
        second copy of the training set.

        Args:
            indices: int64 row indices into the original ``train`` of rows kept in the index (any shape).

        Returns:
            float32 images, shape ``indices.shape + sample_shape``, on :attr:`device`.
        """
        if not self.holds_images:
            raise config_error("this index holds feature_fn features, not images: keep the images yourself.")
        idx = indices.to(self.device).long()
        if self._row_ids is not None:
            pos = torch.searchsorted(self._row_ids, idx.reshape(-1))
            pos = pos.clamp(max=len(self._row_ids) - 1)
            if not bool((self._row_ids[pos] == idx.reshape(-1)).all()):
                raise config_error("indices hold rows removed as duplicates; pass indices returned by search().")
            idx = pos.reshape(idx.shape)
        if bool(((idx < 0) | (idx >= self._n)).any()):
            raise config_error(f"indices must lie in [0, {self._n}).")
        rows = self._source.gather(idx.cpu() if not self._source.held else idx)
        return rows.to(self.device).reshape(*indices.shape, *self.sample_shape)

    # ----------------------------------------------------------------------------------------------- search
    def search(self, queries: Tensor, k: int = 2, *, name: str = "queries") -> tuple[Tensor, Tensor]:
        """The ``k`` nearest training rows of each query, nearest first.

        Args:
            queries: ``(m, ...)`` floating-point tensor with the training images' per-sample shape (or
                ``feature_fn``'s input shape), ``m >= 1``. Never modified; copied to :attr:`device` if needed.
            k: neighbours per query, ``1 <= k <= num_train``.
            name: what the queries are called in error messages (e.g. ``"generated"``).

        Returns:
            ``(distances, indices)``, both ``(m, k)`` on :attr:`device`: true L2 distances (not squared,
            float32, ascending, ties broken by lower index) and int64 row indices into the original ``train``.
        """
        return self._search(queries, k, name)

    def prepare_queries(self, queries: Tensor, name: str = "queries") -> Tensor:
        """Checked, ``feature_fn``-mapped, flattened float32 queries ``(m, dim)`` on :attr:`device`."""
        queries = check_batch(queries, name)
        with torch.no_grad():
            parts = [
                self._prepare(queries[i : i + self.block_size].detach(), name)
                for i in range(0, len(queries), self.block_size)
            ]
        return torch.cat(parts)

    def _search_sq(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact squared distances (float64) and original row indices of the ``k`` nearest rows of prepared
        queries ``q``; ``k`` may exceed :attr:`num_train` (missing neighbours: ``inf`` and ``-1``)."""
        m = len(q)
        kk = min(k, self.num_train)
        d2 = torch.full((m, k), torch.inf, dtype=torch.float64, device=self.device)
        indices = torch.full((m, k), -1, dtype=torch.int64, device=self.device)
        if kk == 0 or m == 0:
            return d2, indices
        with torch.no_grad():
            if self.backend == "torch-bf16":
                found_d2, found_idx, unsure = self._screened(q, kk)
            else:
                found_d2, found_idx, unsure = self._fast_and_exact(q, kk)
            if len(unsure):
                self.num_fallback += len(unsure)
                found_d2[unsure], found_idx[unsure] = self._widened_search(q[unsure], found_d2[unsure, -1], kk)
        if self._row_ids is not None:
            found_idx = self._row_ids[found_idx]
        d2[:, :kk], indices[:, :kk] = found_d2, found_idx
        self.num_searched += m
        return d2, indices

    def _prepare(self, x: Tensor, name: str) -> Tensor:
        """Move to the index device, apply ``feature_fn``, flatten to float32 ``(rows, D)``; checks the shapes."""
        if name != "train" and self.feature_fn is None and tuple(x.shape[1:]) != self.sample_shape:
            self._shape_error(tuple(x.shape[1:]), self.sample_shape, name, "per-sample shape")
        x = x.to(self.device)
        if self.feature_fn is not None:
            if name == "train":
                parts = [self.feature_fn(x[i : i + self.block_size]) for i in range(0, len(x), self.block_size)]
                x = torch.cat([check_float_tensor(p, "feature_fn(train)") for p in parts])
                self._feature_shape = tuple(x.shape[1:])
            else:
                x = check_float_tensor(self.feature_fn(x), f"feature_fn({name})")
                if tuple(x.shape[1:]) != self._feature_shape:
                    assert self._feature_shape is not None
                    self._shape_error(tuple(x.shape[1:]), self._feature_shape, f"feature_fn({name})", "feature shape")
            x = check_batch(x.to(self.device), f"feature_fn({name})")
        return x.reshape(len(x), -1).to(torch.float32)

    def _shape_error(self, got: tuple[int, ...], want: tuple[int, ...], name: str, what: str) -> None:
        hint = ""
        if len(got) == 3 and len(want) == 3 and got == (want[1], want[2], want[0]):
            hint = f" It looks channels-last: convert with `{name}.permute(0, 3, 1, 2)`."
        elif math.prod(got) == math.prod(want):
            hint = f" Same number of values in another layout: if that is meant, `{name}.reshape(-1, *{want})`."
        space = "feature" if what == "feature shape" else "flattened"
        raise config_error(
            f"{name} have {space} dimension {math.prod(got)} but the index was built with dimension {self.dim}: "
            f"{what} {got} against {want}. Pass {name} with the same shape as the training images (or the same "
            f"feature_fn), e.g. in the same resolution, layout and number of channels.{hint}"
        )

    def _search(self, queries: Tensor, k: int, name: str) -> tuple[Tensor, Tensor]:
        """:meth:`search` with the queries' name for error messages (used by the memorization metrics)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            raise config_error(f"k must be an int in [1, num_train={self.num_train}]; got {k!r}.")
        d2, indices = self._search_sq(self.prepare_queries(queries, name), k)
        return d2.sqrt().to(torch.float32), indices

    # ---------------------------------------------------------------------------------------- fast passes
    def _fast_block(self, start: int, stop: int) -> Tensor:
        """Database rows ``[start, stop)`` as the fast pass sees them (centred when there is an offset)."""
        rows = self._source.block(start, stop, self.device).to(self.device)
        return rows if self._mean is None else rows - self._mean

    def _centred(self, q: Tensor) -> Tensor:
        return q if self._mean is None else q - self._mean

    def _fast_and_exact(self, q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """float32 fast pass (torch or faiss), exact re-ranking and certificate for all prepared queries."""
        c = min(k + _candidate_slack(self.dim), self.num_train)
        q_fast = self._centred(q)
        q_norms = (q_fast * q_fast).sum(dim=1).to(torch.float64)
        torch_pass = self.backend in ("torch", "torch-bf16")
        unit_in = _matmul_input_unit(self.device) if torch_pass else 2.0**-11 if self.backend == "faiss-gpu" else 0.0
        # A moderate offset (raw rows at most _OFFSET_FORM_MAX_RATIO times the centred ones) is handled without
        # centring any row: the torch pass uses the offset form (it needs IEEE float32 inputs: its bound has
        # no input-rounding term), faiss-cpu (which computes its own norms of the rows it gets) the raw rows, up to
        # _FAISS_RAW_MAX_DIM dimensions.
        moderate = self._shift_norms64 is not None and unit_in == 0.0 and self.backend != "faiss-gpu"
        if self.backend == "faiss-cpu":
            moderate = moderate and self.dim <= _FAISS_RAW_MAX_DIM
        if torch_pass:
            scores, cand = self._torch_topc(q_fast, c, moderate)
            approx = scores.to(torch.float64) + q_norms[:, None]
            if moderate:  # ||x - (t - mean)||^2 = ||x||^2 + ||t - mean||^2 - 2 x.t + 2 x.mean, x = q - mean
                approx += self._offset_shift(q_fast)[:, None]
            bound = self._offset_bound(q_norms) if moderate else self._bound(q_norms, unit_in, _UNIT_FP32)
        elif moderate:
            approx, cand = self._faiss_topc(q, c, raw=True)
            raw_norms = (q.to(torch.float64) ** 2).sum(dim=1)
            bound = _BOUND_SAFETY * (self.dim + 8) * _UNIT_FP32 * (raw_norms.sqrt() + self._max_raw_norm) ** 2
        else:
            approx, cand = self._faiss_topc(q_fast, c)
            bound = self._bound(q_norms, unit_in, _UNIT_FP32)
        d2, idx = self._rerank_near(q, approx, cand, bound, k)
        if c == self.num_train:
            return d2, idx, torch.empty(0, dtype=torch.int64, device=self.device)
        # Every row outside the candidates has an approximate distance >= the largest candidate's, and its
        # true distance is at most `bound` lower: certified when that still exceeds the exact k-th distance.
        # Written so that NaN or inf anywhere (an overflowing query) leaves the row uncertified.
        certified = (approx.max(dim=1).values - bound > d2[:, -1]) & torch.isfinite(bound) & (not self._overflow)
        return d2, idx, (~certified).nonzero().flatten()

    def _bound(self, q_norms: Tensor, unit_in: float, unit: float) -> Tensor:
        """Bound on |approximate - true| squared distance of the expansion, per query (see the module notes)."""
        coeff = _BOUND_SAFETY * (2.0 * unit_in + (self.dim + 8) * unit)
        return coeff * (q_norms.sqrt() + self._max_norm) ** 2

    def _offset_shift(self, q_fast: Tensor) -> Tensor:
        """``2 x.mean`` per centred query ``x`` (float64): the offset form's distance minus its scores."""
        assert self._mean is not None
        return 2 * (q_fast.to(torch.float64) @ self._mean.to(torch.float64))

    def _offset_bound(self, q_norms: Tensor) -> Tensor:
        """Bound on |approximate - true| squared distance of the offset form, per query.

        The offset form scores raw rows ``t`` against centred queries ``x = float32(q - mean)`` with the exact
        norms ``||t - mean||^2``: ``||t - mean||^2 - 2 x.t`` in float32, then adds ``||x||^2`` (a float32 sum)
        and ``2 x.mean`` in float64. With ``Q = ||x||``, ``T = max ||t||``, ``M = max ||t - mean||`` and
        ``u = 2**-24``: the dot product errs by at most ``gamma_D Q T`` (any summation order), the float32 norm
        of ``x`` by ``gamma_D Q^2``, the float32 norms and the float32 sum by ``u`` times what they add up, and
        the query's rounding to float32 moves its distance by at most ``2.01 u Q (Q + M)``. No row is centred
        during the search: one float32 copy held, and no per-search copy of a block.
        """
        qn, raw, mx = q_norms.sqrt(), self._max_raw_norm, self._max_norm * (1 + 2.0**-20)
        dot = qn * qn + 2 * qn * raw
        sums = 2 * (qn + mx) ** 2 + 2 * qn * raw
        tiny = 2.0**-40 * sums  # float64 corrections
        return _BOUND_SAFETY * ((self.dim + 8) * _UNIT_FP32 * dot + 4 * _UNIT_FP32 * sums) + tiny

    def _torch_topc(self, q: Tensor, c: int, offset: bool = False) -> tuple[Tensor, Tensor]:
        """Running top-``c`` of the float32 scores ``||t||^2 - 2 q.t`` (unsorted); database blocks outermost.
        With ``offset``, scores of the raw rows against the centred queries ``q`` (the offset form)."""
        step, bs = self.database_block_size, self.block_size
        best: list[tuple[Tensor, Tensor] | None] = [None] * len(range(0, len(q), bs))
        tile = torch.empty(min(bs, len(q)), min(step, self._n), dtype=torch.float32, device=self.device)
        norms = self._shift_norms32 if offset else self._norms32
        for j in range(0, self._n, step):
            stop = min(j + step, self._n)
            rows = self._source.block(j, stop, self.device).to(self.device) if offset else self._fast_block(j, stop)
            for b, i in enumerate(range(0, len(q), bs)):
                qb = q[i : i + bs]
                out = tile if tile.shape == (len(qb), len(rows)) else None
                scores = torch.addmm(norms[j : j + len(rows)], qb, rows.T, beta=1, alpha=-2, out=out)
                best[b] = _merge_topc(best[b], scores, c, j)
        return _concat_best(best)

    def _faiss_topc(self, q: Tensor, c: int, raw: bool = False) -> tuple[Tensor, Tensor]:
        """faiss' top-``c`` approximate squared distances (float64) and rows, of the rows as the fast pass sees
        them (``raw``: of the raw rows). Centred rows are made block by block in one reused buffer (a fresh
        block per call costs more than the subtraction: page faults)."""
        faiss = self._faiss
        q = q.contiguous()
        if self.backend == "faiss-gpu":  # pragma: no cover - needs a GPU build of faiss
            device = self.device.index if self.device.index is not None else torch.cuda.current_device()
            rows = self._source.rows if self._mean is None else self._source.rows - self._mean
            dist, cand = faiss.knn_gpu(self._faiss_res, q, rows, c, device=device)
            return dist.to(torch.float64), cand
        q_np = q.numpy()
        centre = self._mean is not None and not raw
        step = self._n if self._source.held and not centre else max(self.database_block_size, _FAISS_DB_BLOCK)
        buffer = torch.empty(min(step, self._n), self.dim) if centre else None
        best: tuple[Tensor, Tensor] | None = None
        for j in range(0, self._n, step):
            stop = min(j + step, self._n)
            rows = self._source.block(j, stop, self.device)
            if buffer is not None:
                rows = torch.sub(rows, self._mean, out=buffer[: len(rows)])
            rows = rows.contiguous()
            dropped = None if self._dropped is None else self._dropped[j : j + len(rows)]
            extra = 0 if dropped is None else int(dropped.sum())  # masked duplicates faiss may still return
            cc = min(c + extra, len(rows))
            dist = torch.empty(len(q), cc, dtype=torch.float32)
            cand = torch.empty(len(q), cc, dtype=torch.int64)
            # faiss (1.15) computes the norms of the rows itself: give them as the rows are anyway
            norms = (self._raw_norms32 if raw else self._norms32)[j : j + len(rows)].contiguous()
            faiss.knn_L2sqr(
                faiss.swig_ptr(q_np),
                faiss.swig_ptr(rows.numpy()),
                self.dim,
                len(q),
                len(rows),
                cc,
                faiss.swig_ptr(dist.numpy()),
                faiss.swig_ptr(cand.numpy()),
                faiss.swig_ptr(norms.numpy()),
            )
            if extra:
                assert dropped is not None
                dist[dropped[cand.clamp_min(0)]] = torch.inf
            best = _merge_topc(best, dist, c, j, cand)
        assert best is not None
        return best[0].to(torch.float64), best[1]

    # ------------------------------------------------------------------------------- split-bf16 screening
    def _screen_rows(self, start: int, stop: int) -> Tensor:
        """Screening rows ``[hi, lo, hi, -||t||^2/2 in 3 parts, 1, 1, 1, 0...]`` in bfloat16."""
        rows = self._fast_block(start, stop)
        out = torch.zeros(len(rows), _screen_width(self.dim), dtype=torch.bfloat16, device=self.device)
        d = self.dim
        hi = rows.to(torch.bfloat16)
        out[:, :d] = hi
        out[:, d : 2 * d] = (rows - hi.to(torch.float32)).to(torch.bfloat16)
        out[:, 2 * d : 3 * d] = hi
        out[:, 3 * d : 3 * d + 3] = _split3(-self._norms64[start:stop] / 2)
        out[:, 3 * d + 3 : 3 * d + 6] = 1
        return out

    def _screen_queries(self, q_fast: Tensor, q_norms: Tensor) -> Tensor:
        d = self.dim
        out = torch.zeros(len(q_fast), _screen_width(d), dtype=torch.bfloat16, device=self.device)
        hi = q_fast.to(torch.bfloat16)
        out[:, :d] = hi
        out[:, d : 2 * d] = hi
        out[:, 2 * d : 3 * d] = (q_fast - hi.to(torch.float32)).to(torch.bfloat16)
        out[:, 3 * d : 3 * d + 3] = 1
        out[:, 3 * d + 3 : 3 * d + 6] = _split3(-q_norms / 2)
        return out

    def _screened(self, q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Split-bf16 screen, exact re-ranking and its certificate. Rows it cannot certify are screened again
        with more candidates, then go through the float32 path (:meth:`_fast_and_exact`), whose own
        uncertified rows are returned for the widened pass."""
        q_fast = self._centred(q)
        q_norms = (q_fast.to(torch.float64) ** 2).sum(dim=1)
        qs = self._screen_queries(q_fast, q_norms)
        d2, idx, unsure = self._screen_pass(q, qs, q_norms, k, k + _SCREEN_SLACK)
        if len(unsure):
            self.num_screen_fallback += len(unsure)
            d2_w, idx_w, still = self._screen_pass(q[unsure], qs[unsure], q_norms[unsure], k, k + _SCREEN_WIDE)
            d2[unsure], idx[unsure] = d2_w, idx_w
            unsure = unsure[still]
        if len(unsure) == 0:
            return d2, idx, unsure
        self.num_screen_float32 += len(unsure)
        d2_f, idx_f, unsure_f = self._fast_and_exact(q[unsure], k)
        d2[unsure], idx[unsure] = d2_f, idx_f
        return d2, idx, unsure[unsure_f]

    def _screen_pass(self, q: Tensor, qs: Tensor, q_norms: Tensor, k: int, c: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``c`` screen over the database, exact re-ranking, and the rows the bound cannot certify."""
        c = min(c, self.num_train)
        bs = self.block_size
        best: list[tuple[Tensor, Tensor] | None] = [None] * len(range(0, len(q), bs))
        with _float32_accumulation(self.device):
            self._screen_blocks(qs, c, best)
        best_s, best_i = _concat_best(best)
        exact, cand = self._rerank(q, best_i)
        d2, idx = exact[:, :k].contiguous(), cand[:, :k].contiguous()
        if c == self.num_train:
            return d2, idx, torch.empty(0, dtype=torch.int64, device=self.device)
        # Rows outside the candidates have out <= out_c (the c-th largest); if out_c <= 0, their true squared
        # distance is >= 2 |out_c| (1 - u) - 2 E (see the module notes). NaN/inf never certify.
        out_c = best_s.min(dim=1).values.to(torch.float64)
        unit = _UNIT_BF16 / (1 - _UNIT_BF16)
        lower = 2 * (-out_c) * (1 - unit) - 2 * self._screen_error(q_norms)
        certified = (out_c <= 0) & (lower > d2[:, -1]) & torch.isfinite(lower) & (not self._overflow)
        return d2, idx, (~certified).nonzero().flatten()

    def _screen_blocks(self, qs: Tensor, c: int, best: list[tuple[Tensor, Tensor] | None]) -> None:
        step, bs = self.database_block_size, self.block_size
        for j in range(0, self._n, step):
            stop = min(j + step, self._n)
            rows = self._screen[j:stop] if self._screen is not None else self._screen_rows(j, stop)
            if self._dropped is not None:  # streamed rows: never the cached copy
                rows[self._dropped[j:stop].to(rows.device), 3 * self.dim] = -torch.inf
            for b, i in enumerate(range(0, len(qs), bs)):
                out = torch.mm(qs[i : i + bs], rows.T)  # ~ -d^2/2, bfloat16 (one rounding of a float32 sum)
                best[b] = _merge_topc(best[b], out, c, j, largest=True)

    def _screen_error(self, q_norms: Tensor) -> Tensor:
        """``E`` of the module notes: bound on |screen sum - (-d^2/2)| before its rounding to bfloat16."""
        width = _screen_width(self.dim)
        gamma = width * _UNIT_FP32 / (1 - width * _UNIT_FP32)
        qn, mx = q_norms.sqrt(), self._max_norm
        both = (qn + mx) ** 2
        tiny = 2.0**-120 * width * (qn + mx + 1)  # flushed bfloat16/float32 subnormals
        return _BOUND_SAFETY * (3.1 * 2.0**-16 * qn * mx + gamma * 1.03 * both / 2 + 4 * _UNIT_FP32 * both + tiny)

    # ----------------------------------------------------------------------------------- exact re-ranking
    def _widened_search(self, q: Tensor, kth: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact top-``k`` for rows the fast pass could not certify.

        Every training row whose approximate distance minus the bound does not exceed ``kth`` (the exact k-th
        distance found so far) could belong to the top ``k``; all of them get exact distances (all rows, for a
        query whose bound is not finite). The scores are float32 (float64 when torch's matmul precision allows
        TF32/bfloat16), blocked over the database.
        """
        unit_in = _matmul_input_unit(self.device)
        q_big = bool((self._centred(q).abs().amax() > 1e18).item()) if len(q) else False
        fp32 = unit_in == 0.0 and not self._overflow and not q_big
        dtype, unit = (torch.float32, _UNIT_FP32) if fp32 else (torch.float64, 2.0**-53)
        norms = self._norms32 if dtype == torch.float32 else self._norms64
        best_d2 = torch.full((len(q), k), torch.inf, dtype=torch.float64, device=self.device)
        best_idx = torch.zeros(len(q), k, dtype=torch.int64, device=self.device)
        for i in range(0, len(q), self.block_size):
            qb = q[i : i + self.block_size]
            q_fast = self._centred(qb)
            q_norms = (q_fast.to(torch.float64) ** 2).sum(dim=1)
            limit = kth[i : i + self.block_size] - q_norms + self._bound(q_norms, 0.0, unit)
            everything = ~torch.isfinite(limit)  # overflow: exact distances to all rows
            q_fast = q_fast.to(dtype)
            for j in range(0, self._n, self.database_block_size):
                rows = self._fast_block(j, min(j + self.database_block_size, self._n)).to(dtype)
                scores = torch.addmm(norms[j : j + len(rows)], q_fast, rows.T, beta=1, alpha=-2)
                keep = (scores.to(torch.float64) <= limit[:, None]) | everything[:, None]
                if self._dropped is not None:  # duplicates in streamed rows are masked, not removed
                    keep &= ~self._dropped[j : j + len(rows)].to(keep.device)[None, :]
                pair_q, pair_t = keep.nonzero(as_tuple=True)
                if len(pair_q) == 0:
                    continue
                pair_d2 = self._pair_distances(qb, pair_q, pair_t + j)
                d2, idx = _best_per_row(
                    best_d2[i : i + len(qb)], best_idx[i : i + len(qb)], pair_q, pair_t + j, pair_d2
                )
                best_d2[i : i + len(qb)], best_idx[i : i + len(qb)] = d2, idx
        return best_d2, best_idx

    def _pair_distances(self, q: Tensor, pair_q: Tensor, pair_t: Tensor) -> Tensor:
        """Exact squared distances (float64 differences) between ``q[pair_q]`` and rows ``pair_t``."""
        out = torch.empty(len(pair_q), dtype=torch.float64, device=self.device)
        step = 64 * _RERANK_CHUNK
        for i in range(0, len(pair_q), step):
            out[i : i + step] = self._exact_sq(q[pair_q[i : i + step]], pair_t[i : i + step, None])[:, 0]
        return out

    def _rerank_near(self, q: Tensor, approx: Tensor, cand: Tensor, bound: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact top-``k`` (squared distances, rows) among the candidates, computing exact distances only for
        those that can belong to it.

        With ``a_k`` the k-th smallest approximate distance of a row, a candidate with approximate distance
        above ``a_k + 2 bound`` is, in exact arithmetic, strictly farther than the ``k`` candidates at or
        below ``a_k`` (each within ``bound`` of its approximation), so it is skipped; rows where any later
        candidate is not that far (or a value is not finite) get all their candidates re-ranked.
        """
        if cand.shape[1] <= k or self._overflow:
            exact, cand = self._rerank(q, cand)
            return exact[:, :k].contiguous(), cand[:, :k].contiguous()
        approx, order = approx.sort(dim=1)
        cand = torch.gather(cand, 1, order)
        far = approx[:, k:] > approx[:, k - 1 : k] + 2 * bound[:, None]  # False for NaN
        few = far.all(dim=1)
        d2 = torch.empty(len(q), k, dtype=torch.float64, device=self.device)
        idx = torch.empty(len(q), k, dtype=torch.int64, device=self.device)
        for rows, width in ((few.nonzero().flatten(), k), ((~few).nonzero().flatten(), cand.shape[1])):
            if len(rows) == len(q):
                rows = slice(None)  # type: ignore[assignment]
            elif len(rows) == 0:
                continue
            exact, found = self._rerank(q[rows], cand[rows, :width])
            d2[rows], idx[rows] = exact[:, :k], found[:, :k]
        return d2, idx

    def _rerank(self, q: Tensor, cand: Tensor) -> tuple[Tensor, Tensor]:
        """Exact squared distances of the candidates, sorted; ties by lower row."""
        cand, _ = cand.sort(dim=1)
        exact, order = self._exact_sq(q, cand).sort(dim=1, stable=True)
        return exact, torch.gather(cand, 1, order)

    def _exact_sq(self, q: Tensor, cand: Tensor) -> Tensor:
        """``||q[i] - rows[cand[i, j]]||^2`` from float64 differences of the float32 rows, ``(b, c)`` float64."""
        out = torch.empty(cand.shape, dtype=torch.float64, device=self.device)
        if self.device.type == "cpu" and _NUMPY_ON_CPU:
            # numpy, single-threaded, in cache-sized chunks: many small OpenMP regions cost more than the work
            # itself when the cores are shared (a training job's data loaders, other processes).
            q_np, cand_np, out_np = q.numpy(), cand.numpy(), out.numpy()
            chunk = max(1, min(_RERANK_CHUNK, _RERANK_BYTES // max(1, 8 * cand.shape[1] * self.dim)))
            for i in range(0, len(q), chunk):
                diff = self._source.gather_np(cand_np[i : i + chunk]).astype(np.float64)
                diff -= q_np[i : i + chunk, None, :]
                out_np[i : i + chunk] = np.einsum("ijk,ijk->ij", diff, diff)
            return out
        step = 64 * _RERANK_CHUNK
        for i in range(0, len(q), step):
            diff = self._source.gather(cand[i : i + step]).to(self.device, torch.float64)
            diff -= q[i : i + step, None, :].to(torch.float64)
            out[i : i + step] = (diff * diff).sum(dim=2)
        return out


@contextlib.contextmanager
def _float32_accumulation(device: torch.device) -> Iterator[None]:
    """On CUDA, forbid cuBLAS' reduced-precision (bfloat16) reductions, which the screen's bound excludes."""
    if device.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def _candidate_slack(dim: int) -> int:
    """Extra float32 candidates: the bound grows with ``dim`` while distances concentrate, so high-dimensional
    rows need more of them to certify (d = 12,288: 15.6% of queries took the widened pass with 4, see
    ``benchmarks/memory.py``)."""
    return _CANDIDATE_SLACK if dim <= 2048 else _CANDIDATE_SLACK_HIGH_DIM


def _concat_best(best: list[tuple[Tensor, Tensor] | None]) -> tuple[Tensor, Tensor]:
    assert all(b is not None for b in best)
    return torch.cat([b[0] for b in best if b is not None]), torch.cat([b[1] for b in best if b is not None])


def _screen_width(dim: int) -> int:
    """Inner dimension of the screening GEMM: 3 D + 6 extra columns, padded to a multiple of 32."""
    return -(-(3 * dim + 6) // 32) * 32


def _split3(v: Tensor) -> Tensor:
    """float64 ``v`` as three bfloat16 parts whose sum is ``v`` to about 2**-24 relative, ``(len, 3)``."""
    a = v.to(torch.bfloat16)
    r = v - a.to(torch.float64)
    b = r.to(torch.bfloat16)
    r = r - b.to(torch.float64)
    return torch.stack([a, b, r.to(torch.bfloat16)], dim=1)


def _positive_int(value: object, name: str) -> int:
    return check_int(value, name, minimum=1)


def _check_enough_rows(n: int, name: str, *, after_dedupe: bool) -> None:
    if n >= 2:
        return
    what = "distinct rows (after removing exact duplicates)" if after_dedupe else "rows"
    raise config_error(
        f"{name} holds {n} {what}, but the memorization ratio compares the nearest and second-nearest "
        f"training examples: pass a training set with at least 2 distinct examples."
    )


def _build_block(dim: int) -> int:
    return max(1, _BUILD_SCRATCH // (8 * max(dim, 1)))


_HASH_SEED = 0x6D656D77


@functools.lru_cache(maxsize=8)
def _hash_coefficients(dim: int) -> Tensor:
    g = torch.Generator().manual_seed(_HASH_SEED)
    return torch.randint(-(2**62), 2**62, (dim,), generator=g, dtype=torch.int64) * 2 + 1


def _hash_block(rows: Tensor) -> Tensor:
    """64-bit hash of each float32 row's bits (``-0.0`` as ``0.0``); sums wrap modulo 2**64, in any order."""
    bits = (rows.to(torch.float32) + 0.0).contiguous().view(torch.int32).to(torch.int64)
    return (bits * _hash_coefficients(rows.shape[1]).to(rows.device)).sum(dim=1)


def _row_hashes(source: _Rows, device: torch.device) -> Tensor:
    step = _build_block(source.dim)
    parts = [_hash_block(source.block(j, min(j + step, source.n), device)) for j in range(0, source.n, step)]
    return torch.cat(parts).cpu() if parts else torch.empty(0, dtype=torch.int64)


def _duplicate_groups(hashes: Tensor, fetch: Callable[[Tensor], Tensor]) -> Tensor:
    """Mask of rows that exactly equal an earlier row (by number). ``hashes``: one per row; ``fetch(rows)``
    returns those rows (float32, ``(len, D)``) for exact confirmation of hash collisions."""
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


def _duplicate_mask(hashes: Tensor, source: _Rows) -> Tensor:
    return _duplicate_groups(hashes, lambda rows: source.gather(rows.to(_source_device(source))))


def _source_device(source: _Rows) -> torch.device:
    return source.rows.device if source.held else torch.device("cpu")


def _blocked_mean(source: _Rows, device: torch.device, dropped: Tensor | None) -> Tensor:
    """float64 mean of the (kept) rows, summed in blocks: no float64 copy of the data."""
    total = torch.zeros(source.dim, dtype=torch.float64, device=device)
    step = _build_block(source.dim)
    for j in range(0, source.n, step):
        block = source.block(j, min(j + step, source.n), device).to(device, torch.float64)
        if dropped is not None:
            block = block[~dropped[j : j + len(block)].to(device)]
        total += block.sum(dim=0)
    kept = source.n - (int(dropped.sum()) if dropped is not None else 0)
    return total / max(kept, 1)


def _blocked_sq_norms(
    source: _Rows, device: torch.device, centre64: Tensor | None, centre32: Tensor | None = None
) -> Tensor:
    """float64 squared norms of ``rows - centre64`` (exact centre), or of ``float32(rows - centre32)``."""
    step = _build_block(source.dim)
    parts = []
    for j in range(0, source.n, step):
        part = source.block(j, min(j + step, source.n), device).to(device)
        if centre32 is not None:
            part = part - centre32
        part = part.to(torch.float64)
        if centre64 is not None:
            part = part - centre64
        parts.append((part * part).sum(dim=1))
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=device)


def _blocked_offset_norms(source: _Rows, device: torch.device, centre32: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 squared norms of ``float32(rows - centre32)``, of the exact ``rows - centre32`` and of the rows,
    in one pass over the rows."""
    step = _build_block(source.dim)
    rounded, exact, raw = [], [], []
    centre64 = centre32.to(torch.float64)
    for j in range(0, source.n, step):
        part = source.block(j, min(j + step, source.n), device).to(device)
        diff = (part - centre32).to(torch.float64)
        rounded.append((diff * diff).sum(dim=1))
        part = part.to(torch.float64)
        raw.append((part * part).sum(dim=1))
        part -= centre64
        exact.append((part * part).sum(dim=1))
    empty = torch.empty(0, dtype=torch.float64, device=device)
    return tuple(torch.cat(x) if x else empty for x in (rounded, exact, raw))  # type: ignore[return-value]


def _best_per_row(
    best_d2: Tensor, best_idx: Tensor, pair_q: Tensor, pair_t: Tensor, pair_d2: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge new (query, row, squared distance) pairs into the per-query best ``k``, ties by lower row."""
    rows, k = best_d2.shape
    kept = torch.isfinite(best_d2)
    q_all = torch.cat([torch.arange(rows, device=best_d2.device)[:, None].expand(rows, k)[kept], pair_q])
    t_all = torch.cat([best_idx[kept], pair_t])
    d_all = torch.cat([best_d2[kept], pair_d2])
    # Pairs never repeat (database blocks are disjoint); order them by query, then distance, then row.
    order = torch.argsort(t_all, stable=True)
    order = order[torch.argsort(d_all[order], stable=True)]
    order = order[torch.argsort(q_all[order], stable=True)]
    q_all, t_all, d_all = q_all[order], t_all[order], d_all[order]
    counts = torch.bincount(q_all, minlength=rows)
    rank = torch.arange(len(q_all), device=q_all.device) - (torch.cumsum(counts, 0) - counts)[q_all]
    top = rank < k
    new_d2 = torch.full_like(best_d2, torch.inf)
    new_idx = torch.zeros_like(best_idx)
    new_d2[q_all[top], rank[top]] = d_all[top]
    new_idx[q_all[top], rank[top]] = t_all[top]
    return new_d2, new_idx


def _merge_topc(
    best: tuple[Tensor, Tensor] | None,
    scores: Tensor,
    c: int,
    offset: int,
    rows: Tensor | None = None,
    *,
    largest: bool = False,
) -> tuple[Tensor, Tensor]:
    """Merge the ``c`` best ``scores`` of one database block (rows from ``offset``; or local ``rows`` when the
    scores are already a top list) into ``best``; values come back as float32."""
    s, i = torch.topk(scores, min(c, scores.shape[1]), dim=1, largest=largest, sorted=False)
    i = (i if rows is None else torch.gather(rows, 1, i)) + offset
    s = s.to(torch.float32)
    if best is None:
        return s, i
    s, i = torch.cat([best[0], s], dim=1), torch.cat([best[1], i], dim=1)
    s, sel = torch.topk(s, min(c, s.shape[1]), dim=1, largest=largest, sorted=False)
    return s, torch.gather(i, 1, sel)
