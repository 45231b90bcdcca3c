"""Exact k-nearest-neighbour search of generated samples in the training set (L2 distance).

:class:`NearestNeighbourIndex` is built once over the training set and answers, for every query (a generated
sample), its ``k`` nearest training rows and their true (not squared) Euclidean distances. It is the engine of
the memorization ratio ``d1 / d2`` in :mod:`lightning_memwatch.metrics.memorization`.

Decisions, in one place:

* **Exact, and certified.** Every backend first finds ``k + 4`` candidate neighbours with fast float32
  arithmetic (a GEMM on ``||t||^2 - 2 q.t``, or faiss, which uses the same expansion). That expansion loses
  precision when two points are much closer than their norms, so the candidates' distances are then
  recomputed from the original float32 rows with float64 differences, and re-ranked. A rigorous bound on the
  float32 rounding error, ``1.25 (D + 8) 2**-24 (||q|| + max ||t||)**2`` (widened when TF32/bfloat16 matmuls
  are enabled), then certifies, row by row, that no training row outside the candidates can be closer than the
  k-th neighbour found. Rows that cannot be certified (near-ties at the boundary, rare in practice) are
  searched again: every training row whose approximate distance is within the bound of the k-th exact one
  gets an exact distance (``num_fallback`` counts these rows). Results are therefore those of float64
  arithmetic on the float32 rows: an exact copy of a training row has distance exactly 0, nearly tied
  neighbours are never silently swapped, and exact ties go to the lower row index.
* **Offsets.** When the data share a common offset larger than their spread (e.g. images in [0, 1], or
  anything far from the origin), the fast pass runs on rows centred on the training mean, which keeps the
  bound small; this costs a second float32 copy of the index. Exact distances always use the original rows.
* **Exact duplicates** in the training set would make ``d2 = 0`` for a copy of them. They are removed at build
  time (``dedupe=True``, with a warning); returned indices point to the first original row of each group.
  With ``dedupe=False`` duplicates are kept and the memorization ratio defines ``0 / 0 = 0``.
* **Memory** stays at the index (``n x D`` float32, twice when centred, plus ``n`` norms) plus one tile of
  ``block_size x database_block_size`` float32 scores and ``64 x (k + 4) x D`` float64 candidates.
  No ``m x n`` distance matrix is ever built.
* **Backends.** ``"auto"`` takes faiss on the GPU when faiss sees GPUs and the training data are on CUDA,
  faiss on the CPU for CPU data, and the blocked torch matmul (any device torch supports) when faiss is not
  installed. Each can be forced with ``backend=``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch._checks import check_batch, check_float_tensor, check_int

__all__ = ["BACKENDS", "NearestNeighbourIndex", "available_backends"]

Backend = Literal["auto", "faiss-gpu", "faiss-cpu", "torch"]
BACKENDS: tuple[str, ...] = ("auto", "faiss-gpu", "faiss-cpu", "torch")

# Extra approximate neighbours that are re-ranked with exact distances. With 2, about 0.2% of queries on random
# image-like data (n=32768, D=1024) needed the widened pass (~20-60 ms each time it runs); with 4, none did, for
# a few ms more of re-ranking per 1000 queries.
_CANDIDATE_SLACK = 4
# Safety factor on the rounding-error bound of the float32 expansion.
_BOUND_SAFETY = 1.25
_UNIT_FP32 = 2.0**-24
# Queries per chunk of the exact re-ranking, and whether CPU re-ranking runs in numpy (see `_exact_sq`).
_RERANK_CHUNK = 64
_NUMPY_ON_CPU = True


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


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable here for data on ``device`` (``"auto"`` excluded), fastest first.

    Args:
        device: where the training data live.

    Returns:
        A sublist of ``["faiss-gpu", "faiss-cpu", "torch"]``; ``"torch"`` is always present.
    """
    device = torch.device(device)
    faiss = _import_faiss()
    found = []
    if device.type == "cuda" and _faiss_num_gpus(faiss) > 0:
        found.append("faiss-gpu")
    if faiss is not None:
        found.append("faiss-cpu")
    found.append("torch")
    return found


def _resolve_backend(backend: str, device: torch.device) -> tuple[str, torch.device]:
    """The backend actually used and the device the index lives on."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}; got {backend!r}.")
    faiss = _import_faiss()
    if backend == "auto":
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
    return "torch", device


def _matmul_input_unit(device: torch.device) -> float:
    """Unit roundoff of the *inputs* of a float32 matmul under torch's current precision settings.

    0 for IEEE float32 ("highest"), 2**-11 when TF32 may be used, 2**-8 when bfloat16 may be used.
    """
    unit = {"highest": 0.0, "high": 2.0**-11}.get(torch.get_float32_matmul_precision(), 2.0**-8)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        unit = max(unit, 2.0**-11)
    return unit


class NearestNeighbourIndex:
    """Exact L2 k-nearest-neighbour index over a training set, built once, queried many times.

    Training images ``(n, C, H, W)`` (or any ``(n, ...)``) are flattened to ``(n, D)`` float32 rows, after
    ``feature_fn`` if given. Queries go through the same ``feature_fn`` and flattening.

    Args:
        train: training set, ``(n, ...)`` floating-point tensor with at least 2 distinct rows. Never modified.
        backend: ``"auto"`` (default), ``"faiss-gpu"``, ``"faiss-cpu"`` or ``"torch"`` (see the module notes).
        feature_fn: optional map from a batch of images to a batch of features, applied to ``train`` at build
            time and to every query batch at search time (under ``torch.no_grad()``). It must be
            deterministic: an exact copy is recognised only if it gets exactly the same features.
        dedupe: remove exact duplicate rows at build time, with a warning (default). Indices returned by
            :meth:`search` always refer to rows of the original ``train``.
        block_size: queries (rows) per block; ``None`` picks 1024 on CPU and 4096 on CUDA.
        database_block_size: training rows per block of the torch backend; ``None`` picks 4096 on CPU and
            16384 on CUDA. Peak extra memory is about ``4 * block_size * database_block_size`` bytes.

    Attributes:
        num_train: rows in the index (after removing duplicates).
        num_duplicates: rows removed as exact duplicates.
        dim: length of a flattened (feature) row.
        backend: the backend actually used.
        device: where the index lives; queries elsewhere are copied here.

    Example:
        >>> train = torch.randn(100, 3, 4, 4)
        >>> index = NearestNeighbourIndex(train, backend="torch")
        >>> distances, indices = index.search(train[:5])
        >>> distances[:, 0].tolist(), indices[:, 0].tolist()
        ([0.0, 0.0, 0.0, 0.0, 0.0], [0, 1, 2, 3, 4])
    """

    def __init__(
        self,
        train: Tensor,
        *,
        backend: Backend = "auto",
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        dedupe: bool = True,
        block_size: int | None = None,
        database_block_size: int | None = None,
    ) -> None:
        train = check_float_tensor(train, "train")
        if train.ndim >= 2:
            _check_enough_rows(len(train), "train", after_dedupe=False)
        train = check_batch(train, "train")
        self.backend, self.device = _resolve_backend(backend, train.device)
        cuda = self.device.type == "cuda"
        if block_size is None:
            block_size = 4096 if cuda else 1024
        if database_block_size is None:
            database_block_size = 16384 if cuda else 4096
        self.block_size = _positive_int(block_size, "block_size")
        self.database_block_size = _positive_int(database_block_size, "database_block_size")
        self.feature_fn = feature_fn

        with torch.no_grad():
            rows = self._prepare(train.detach(), "train")
            self.num_duplicates = 0
            self._row_ids: Tensor | None = None
            if dedupe:
                rows, self._row_ids = _drop_duplicates(rows)
                self.num_duplicates = len(train) - len(rows)
                if self.num_duplicates:
                    warnings.warn(
                        f"train holds {self.num_duplicates} exact duplicate rows (of {len(train)}); they were "
                        "removed from the nearest-neighbour index (a duplicate would make d2 = 0). Returned "
                        "indices point to the first copy. Pass dedupe=False to keep them.",
                        UserWarning,
                        stacklevel=2,
                    )
                _check_enough_rows(len(rows), "train", after_dedupe=True)
            if rows.untyped_storage().data_ptr() == train.untyped_storage().data_ptr():
                rows = rows.clone()  # the index owns its rows: later edits of `train` do not reach it
            self.num_train, self.dim = int(rows.shape[0]), int(rows.shape[1])
            self._rows = rows.contiguous()
            mean64 = rows.mean(dim=0, dtype=torch.float64)
            spread = float(_row_sq_norms(rows, self.database_block_size, mean64).max().sqrt())
            # The fast pass works on centred rows when a common offset dominates the spread (it would inflate
            # the float32 rounding error); otherwise on the rows themselves, with no second copy.
            self._mean: Tensor | None = None
            self._fast = self._rows
            if float(mean64.norm()) > spread:
                self._mean = mean64.to(torch.float32)
                self._fast = (self._rows - self._mean).contiguous()
            self._norms64 = _row_sq_norms(self._fast, self.database_block_size)
            self._norms32 = self._norms64.to(torch.float32)
            self._max_norm = float(self._norms64.max().sqrt())
        self._attach_faiss()
        # Counters, for tests and benchmarks.
        self.num_searched = 0
        self.num_fallback = 0

    def _attach_faiss(self) -> None:
        """(Re)create the faiss handles, which are neither picklable nor copyable."""
        self._faiss: Any = None
        self._faiss_res: Any = None
        if self.backend.startswith("faiss"):
            self._faiss = _import_faiss()
            if self._faiss is None:
                raise ImportError(f"this index was built with backend={self.backend!r} but faiss is not installed.")
            if self.backend == "faiss-cpu":
                self._fast_np = self._fast.numpy()
                self._norms_np = self._norms32.numpy()
            else:
                import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

                self._faiss_res = self._faiss.StandardGpuResources()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_faiss", "_faiss_res", "_fast_np", "_norms_np"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach_faiss()

    def __repr__(self) -> str:
        return (
            f"NearestNeighbourIndex(num_train={self.num_train}, dim={self.dim}, backend={self.backend!r}, "
            f"device={self.device}, num_duplicates={self.num_duplicates})"
        )

    # ----------------------------------------------------------------------------------------------- search
    def search(self, queries: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest training rows of each query, nearest first.

        Args:
            queries: ``(m, ...)`` floating-point tensor shaped like ``train`` (or like ``feature_fn``'s input),
                ``m >= 1``. Never modified; copied to :attr:`device` if needed.
            k: neighbours per query, ``1 <= k <= num_train``.

        Returns:
            ``(distances, indices)``, both ``(m, k)`` on :attr:`device`: true L2 distances (not squared,
            float32, ascending, ties broken by lower index) and int64 row indices into the original ``train``.
        """
        return self._search(queries, k, "queries")

    def _search(self, queries: Tensor, k: int, name: str) -> tuple[Tensor, Tensor]:
        queries = check_batch(queries, name)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            raise ValueError(f"k must be an int in [1, num_train={self.num_train}]; got {k!r}.")
        m = len(queries)
        d2 = torch.empty(m, k, dtype=torch.float64, device=self.device)
        indices = torch.empty(m, k, dtype=torch.int64, device=self.device)
        unsure: list[tuple[Tensor, Tensor]] = []  # (global row numbers, their prepared queries)
        with torch.no_grad():
            for start in range(0, m, self.block_size):
                block = self._prepare(queries[start : start + self.block_size].detach(), name)
                block_d2, block_idx, block_unsure = self._search_block(block, k)
                d2[start : start + len(block)] = block_d2
                indices[start : start + len(block)] = block_idx
                if len(block_unsure):
                    unsure.append((block_unsure + start, block[block_unsure]))
            if unsure:
                rows = torch.cat([r for r, _ in unsure])
                self.num_fallback += len(rows)
                d2[rows], indices[rows] = self._widened_search(torch.cat([q for _, q in unsure]), d2[rows, -1], k)
        if self._row_ids is not None:
            indices = self._row_ids[indices]
        self.num_searched += m
        return d2.sqrt().to(torch.float32), indices

    def _prepare(self, x: Tensor, name: str) -> Tensor:
        """Move to the index device, apply ``feature_fn``, flatten to float32 ``(rows, D)``; checks the dim."""
        x = x.to(self.device)
        if self.feature_fn is not None:
            if name == "train":
                parts = [self.feature_fn(x[i : i + self.block_size]) for i in range(0, len(x), self.block_size)]
                x = torch.cat([check_float_tensor(p, "feature_fn(train)") for p in parts])
            else:
                x = check_float_tensor(self.feature_fn(x), f"feature_fn({name})")
            x = check_batch(x.to(self.device), f"feature_fn({name})")
        x = x.reshape(len(x), -1).to(torch.float32)
        if name != "train" and x.shape[1] != self.dim:
            space = "feature" if self.feature_fn is not None else "flattened"
            raise ValueError(
                f"{name} have {space} dimension {x.shape[1]} but the index was built with dimension {self.dim}. "
                f"Pass {name} with the same shape as the training images (or the same feature_fn), e.g. in the "
                "same resolution and number of channels."
            )
        return x

    def _search_block(self, q: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Fast pass and exact re-ranking for the query rows ``q`` (float32, ``(b, D)``).

        Returns:
            Exact squared distances (float64) and index rows of the ``k`` nearest candidates, and the positions
            of the rows whose result the rounding bound cannot certify (to be searched again).
        """
        c = min(k + _CANDIDATE_SLACK, self.num_train)
        q_fast = q if self._mean is None else q - self._mean
        q_norms = (q_fast * q_fast).sum(dim=1).to(torch.float64)
        if self.backend == "torch":
            scores, cand = self._fast_topc(q_fast, c)
            approx = scores.to(torch.float64) + q_norms[:, None]
            unit_in = _matmul_input_unit(self.device)
        else:
            approx, cand = self._faiss_topc(q_fast, c)
            unit_in = 2.0**-11 if self.backend == "faiss-gpu" else 0.0
        exact, cand = self._rerank(q, cand)
        d2, idx = exact[:, :k], cand[:, :k]
        if c == self.num_train:
            return d2, idx, torch.empty(0, dtype=torch.int64, device=self.device)
        # Every row outside the candidates has an approximate distance >= the largest candidate's, and its
        # true distance is at most `bound` lower: certified when that still exceeds the exact k-th distance.
        bound = self._bound(q_norms, unit_in, _UNIT_FP32)
        return d2, idx, (approx.max(dim=1).values - bound <= d2[:, -1]).nonzero().flatten()

    def _bound(self, q_norms: Tensor, unit_in: float, unit: float) -> Tensor:
        """Bound on |approximate - true| squared distance of the expansion, per query (see the module notes)."""
        coeff = _BOUND_SAFETY * (2.0 * unit_in + (self.dim + 8) * unit)
        return coeff * (q_norms.sqrt() + self._max_norm) ** 2

    def _widened_search(self, q: Tensor, kth: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact top-``k`` for rows the fast pass could not certify.

        Every training row whose approximate distance minus the bound does not exceed ``kth`` (the exact k-th
        distance found so far) could belong to the top ``k``; all of them get exact distances. The scores are
        float32 (float64 when torch's matmul precision allows TF32/bfloat16), blocked over the database.
        """
        unit_in = _matmul_input_unit(self.device)
        dtype, unit = (torch.float32, _UNIT_FP32) if unit_in == 0.0 else (torch.float64, 2.0**-53)
        norms = self._norms32 if dtype == torch.float32 else self._norms64
        best_d2 = torch.full((len(q), k), torch.inf, dtype=torch.float64, device=self.device)
        best_idx = torch.zeros(len(q), k, dtype=torch.int64, device=self.device)
        for i in range(0, len(q), self.block_size):
            qb = q[i : i + self.block_size]
            q_fast = qb if self._mean is None else qb - self._mean
            q_norms = (q_fast.to(torch.float64) ** 2).sum(dim=1)
            limit = kth[i : i + self.block_size] - q_norms + self._bound(q_norms, 0.0, unit)
            q_fast = q_fast.to(dtype)
            for j in range(0, self.num_train, self.database_block_size):
                rows = self._fast[j : j + self.database_block_size].to(dtype)
                scores = torch.addmm(norms[j : j + len(rows)], q_fast, rows.T, beta=1, alpha=-2)
                pair_q, pair_t = (scores.to(torch.float64) <= limit[:, None]).nonzero(as_tuple=True)
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

    def _fast_topc(self, q: Tensor, c: int) -> tuple[Tensor, Tensor]:
        """Running top-``c`` of the float32 scores ``||t||^2 - 2 q.t`` over database blocks (unsorted)."""
        step = self.database_block_size
        tile = torch.empty(len(q), min(step, self.num_train), dtype=torch.float32, device=self.device)
        best: tuple[Tensor, Tensor] | None = None
        for j in range(0, self.num_train, step):
            rows = self._fast[j : j + step]
            out = tile if len(rows) == tile.shape[1] else None
            scores = torch.addmm(self._norms32[j : j + step], q, rows.T, beta=1, alpha=-2, out=out)
            best = _merge_topc(best, scores, c, j)
        assert best is not None
        return best

    def _faiss_topc(self, q: Tensor, c: int) -> tuple[Tensor, Tensor]:
        """faiss' top-``c`` approximate squared distances (float64) and rows."""
        faiss = self._faiss
        q = q.contiguous()
        if self.backend == "faiss-cpu":
            q_np = q.numpy()
            dist = torch.empty(len(q), c, dtype=torch.float32)
            cand = torch.empty(len(q), c, dtype=torch.int64)
            faiss.knn_L2sqr(
                faiss.swig_ptr(q_np),
                faiss.swig_ptr(self._fast_np),
                self.dim,
                len(q),
                self.num_train,
                c,
                faiss.swig_ptr(dist.numpy()),
                faiss.swig_ptr(cand.numpy()),
                faiss.swig_ptr(self._norms_np),
            )
        else:  # pragma: no cover - needs a GPU build of faiss
            device = self.device.index if self.device.index is not None else torch.cuda.current_device()
            dist, cand = faiss.knn_gpu(self._faiss_res, q, self._fast, c, device=device)
        return dist.to(torch.float64), cand

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
            rows, q_np, cand_np, out_np = self._rows.numpy(), q.numpy(), cand.numpy(), out.numpy()
            for i in range(0, len(q), _RERANK_CHUNK):
                diff = rows[cand_np[i : i + _RERANK_CHUNK]].astype(np.float64)
                diff -= q_np[i : i + _RERANK_CHUNK, None, :]
                out_np[i : i + _RERANK_CHUNK] = np.einsum("ijk,ijk->ij", diff, diff)
            return out
        step = 64 * _RERANK_CHUNK
        for i in range(0, len(q), step):
            diff = self._rows[cand[i : i + step]].to(torch.float64)
            diff -= q[i : i + step, None, :].to(torch.float64)
            out[i : i + step] = (diff * diff).sum(dim=2)
        return out


def _positive_int(value: object, name: str) -> int:
    return check_int(value, name, minimum=1)


def _check_enough_rows(n: int, name: str, *, after_dedupe: bool) -> None:
    if n >= 2:
        return
    what = "distinct rows (after removing exact duplicates)" if after_dedupe else "rows"
    raise ValueError(
        f"{name} holds {n} {what}, but the memorization ratio compares the nearest and second-nearest "
        f"training examples: pass a training set with at least 2 distinct examples."
    )


def _drop_duplicates(rows: Tensor) -> tuple[Tensor, Tensor | None]:
    """Keep the first copy of each exact-duplicate group, in the original order.

    Returns:
        The kept rows and, when some were dropped, the original row index of each kept row.
    """
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    num_unique = int(inverse.max()) + 1
    if num_unique == len(rows):
        return rows, None
    order = torch.arange(len(rows), device=rows.device)
    first = torch.full((num_unique,), len(rows), dtype=torch.int64, device=rows.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    keep, _ = first.sort()
    return rows[keep], keep


def _row_sq_norms(rows: Tensor, block: int, centre: Tensor | None = None) -> Tensor:
    """Squared row norms (of ``rows - centre``) in float64, blocked to keep the float64 copy small."""
    parts = []
    for i in range(0, len(rows), block):
        part = rows[i : i + block].to(torch.float64)
        if centre is not None:
            part = part - centre
        parts.append((part * part).sum(dim=1))
    return torch.cat(parts)


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


def _merge_topc(best: tuple[Tensor, Tensor] | None, scores: Tensor, c: int, offset: int) -> tuple[Tensor, Tensor]:
    """Merge the ``c`` smallest ``scores`` of one database block (rows from ``offset``) into ``best``."""
    s, i = torch.topk(scores, min(c, scores.shape[1]), dim=1, largest=False, sorted=False)
    i += offset
    if best is None:
        return s, i
    s, i = torch.cat([best[0], s], dim=1), torch.cat([best[1], i], dim=1)
    s, sel = torch.topk(s, min(c, s.shape[1]), dim=1, largest=False, sorted=False)
    return s, torch.gather(i, 1, sel)
