"""The exact nearest-neighbour index: build (row source, duplicates, centre, norms), search, statistics."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch._checks import check_batch, check_float_tensor, check_int, config_error
from lightning_memwatch.metrics.knn import bounds, exact, int8, scan
from lightning_memwatch.metrics.knn.backends import (
    SCREEN_MAX_AUTO_DIM,
    Backend,
    import_faiss,
    int8_code_limit,
    resolve_backend,
)
from lightning_memwatch.metrics.knn.build import centre_of, centring_pays, duplicate_mask, row_stats, sample_rows
from lightning_memwatch.metrics.knn.rows import HeldRows, as_row_source, source_device

__all__ = ["NearestNeighbourIndex", "SearchStats"]


@dataclass(frozen=True)
class SearchStats:
    """The work of one :meth:`NearestNeighbourIndex.search` (machine-independent counts, and seconds).

    Attributes:
        queries: queries searched.
        certified_at_once: queries whose ``k`` nearest rows were fixed by the fast pass alone (exactly ``k``
            candidates: only their order needed exact distances).
        candidates: candidate rows re-ranked with exact distances, over all queries.
        scans: scans of the training set: 1, or 2 when some query held values float32 cannot (the float64 pass).
        float64_queries: queries that went through the float64 pass.
        rescanned_blocks: blocks of rows scored again with the float32 tile for some queries: (faiss) whose top
            list could not hold all their candidates, (int8) whose codes could not narrow them; the block is
            still in memory, so this is no scan of the training set.
        seconds: wall-clock seconds per pass (``"scan"``, ``"float64"``, ``"rerank"``).
    """

    queries: int
    certified_at_once: int
    candidates: int
    scans: int
    float64_queries: int = 0
    rescanned_blocks: int = 0
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def candidates_per_query(self) -> float:
        """Mean candidates re-ranked per query."""
        return self.candidates / max(self.queries, 1)


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


class NearestNeighbourIndex:
    """Exact L2 k-nearest-neighbour index over a training set, built once, queried many times.

    Training images ``(n, C, H, W)`` (or any ``(n, ...)``) are flattened to ``(n, D)`` float32 rows, after
    ``feature_fn`` if given. Queries go through the same ``feature_fn`` and flattening, and must have the
    training images' per-sample shape (or, with ``feature_fn``, give features of the training features' shape).

    Args:
        train: training set: an ``(n, ...)`` floating-point tensor (copied once, never modified), a float32
            numpy memmap (``np.load(path, mmap_mode="r")``) or a map-style Dataset of images (both streamed in
            database blocks, never copied whole; not with ``feature_fn``). At least 2 distinct rows.
        backend: ``"auto"`` (default), ``"faiss-gpu"``, ``"faiss-cpu"``, ``"torch"``, ``"torch-bf16"`` or
            ``"torch-int8"`` (see the module notes).
        feature_fn: optional map from a batch of images to a batch of features, applied to ``train`` at build
            time and to every query batch at search time (under ``torch.no_grad()``). It must be
            deterministic: an exact copy is recognised only if it gets exactly the same features.
        dedupe: remove exact duplicate rows at build time, with a warning (default). Indices returned by
            :meth:`search` always refer to rows of the original ``train``.
        block_size: queries (rows) per block; ``None`` picks 1024 on CPU and 4096 on CUDA.
        database_block_size: training rows per block; ``None`` picks 4096 on CPU and 16384 on CUDA. Peak extra
            memory of a search is about ``4 * block_size * database_block_size`` bytes plus one centred block.
        screen_copy: keep the screening copy of held rows: ``torch-bf16``'s bfloat16 rows (``(3 D + 6) * 2``
            bytes per row, 1.5x the float32 rows), ``torch-int8``'s codes (``D`` bytes per row); ``False``
            makes them block by block at every search instead (less memory, slower searches).

    Attributes:
        num_train: rows in the index (after removing duplicates).
        num_duplicates: rows removed as exact duplicates.
        num_rows: rows the scans read (streamed: duplicates included, masked).
        dim: length of a flattened (feature) row.
        sample_shape: per-sample shape of the training images (queries must match it).
        backend: the backend actually used.
        device: where the index lives; queries elsewhere are copied here.
        streamed: whether the rows are read from ``train`` in blocks instead of held in memory.
        row_source: the rows (``block``/``gather`` access), held or streamed.
        last_search: :class:`SearchStats` of the latest search (None before the first).

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
        screen_copy: bool = True,
        _min_rows: int = 2,
    ) -> None:
        tensor, streamed, self.sample_shape = as_row_source(train, "train")
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
        self.backend, self.device = resolve_backend(backend, data_device)
        cuda = self.device.type == "cuda"
        if block_size is None:
            block_size = 4096 if cuda else 1024
        self.block_size = _positive_int(block_size, "block_size")
        if database_block_size is not None:
            _positive_int(database_block_size, "database_block_size")
        self.feature_fn = feature_fn
        self._feature_shape: tuple[int, ...] | None = None
        self.streamed = streamed is not None
        self.last_search: SearchStats | None = None
        self.num_searched = 0
        with torch.no_grad():
            if tensor is not None:
                source: HeldRows = HeldRows(self._prepare(tensor.detach(), "train"))
            else:
                assert streamed is not None
                source = streamed
            n, self.dim = source.n, source.dim
            if database_block_size is None:  # 4096 rows on CPU (16384 on CUDA), at most ~64 MiB of float32
                database_block_size = max(256, min(16384 if cuda else 4096, 2**24 // max(self.dim, 1)))
            self.database_block_size = database_block_size
            if backend == "auto" and self.backend == "torch-bf16" and self.dim > SCREEN_MAX_AUTO_DIM:
                self.backend, self.device = resolve_backend("auto", data_device, screen=False)
            if self.backend == "torch-int8" and self.dim > int8.INT8_MAX_DIM:
                if backend != "auto":
                    raise config_error(
                        f"backend='torch-int8' takes rows of at most {int8.INT8_MAX_DIM} values (its integer "
                        f"sums must fit int32); these have {self.dim}: pass backend='auto'."
                    )
                self.backend, self.device = resolve_backend("auto", data_device, screen=False)
            self._build(source, tensor, dedupe=dedupe and n > 1, screen_copy=screen_copy, min_rows=_min_rows)
        self._attach_faiss()

    # ----------------------------------------------------------------------------------------------- build
    def _build(
        self, source: HeldRows, tensor: Tensor | None, *, dedupe: bool, screen_copy: bool, min_rows: int
    ) -> None:
        """Centre (from a sample), duplicates and norms in one pass over the rows (see :mod:`.build`)."""
        n = source.n
        owned = None  # the index owns its rows: later edits of `train` do not reach it
        if (
            source.held
            and tensor is not None
            and source.rows.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        ):
            owned = torch.empty(source.rows.shape, dtype=torch.float32, device=source.rows.device)
        sample = sample_rows(source, self.device) if n else torch.zeros(0, self.dim, device=self.device)
        centre = centre_of(sample) if n else torch.zeros(self.dim, device=self.device)
        codes = None  # the int8 codes, made in the same pass over the rows
        if self.backend == "torch-int8" and n:
            limit = int8_code_limit() or 127
            codes = int8.Int8Builder(n, self.dim, sample, centre, keep_codes=source.held and screen_copy, limit=limit)
        on_block = codes.block if codes is not None else None
        fast_centre = centre if n and centring_pays(sample, centre) else None  # the fast passes' (None: not centred)
        stats = row_stats(source, self.device, hashes=dedupe, copy_to=owned, centre=fast_centre, on_block=on_block)
        if owned is not None:
            source = HeldRows(owned)
        self.num_duplicates = 0
        self._row_ids: Tensor | None = None  # original row of each held row, when rows were dropped
        dropped: Tensor | None = None  # streamed rows: mask of dropped duplicates
        sq_norms = stats.sq_norms
        if stats.hashes is not None:
            mask = duplicate_mask(stats.hashes, source)
            self.num_duplicates = int(mask.sum())
            if self.num_duplicates:
                warnings.warn(
                    f"train holds {self.num_duplicates} exact duplicate rows (of {n}); they were "
                    "removed from the nearest-neighbour index (a duplicate would make d2 = 0). Returned "
                    "indices point to the first copy. Pass dedupe=False to keep them.",
                    UserWarning,
                    stacklevel=3,
                )
                if source.held:
                    keep = (~mask).nonzero().flatten()
                    self._row_ids = keep.to(self.device)
                    source = HeldRows(source.rows[keep.to(source.rows.device)])
                    sq_norms = sq_norms[keep.to(sq_norms.device)]
                else:
                    dropped = mask
        self.num_train = n - self.num_duplicates
        if min_rows:
            _check_enough_rows(self.num_train, "train", after_dedupe=True)
        if source.held:
            source = HeldRows(source.rows.contiguous())
        self.row_source = source
        self.num_rows = source.n  # physical rows (streamed: dropped rows included, masked)
        if dropped is not None:
            sq_norms = torch.where(dropped.to(sq_norms.device), 0.0, sq_norms)
        y_norm = sq_norms.sqrt()
        y_max = float(y_norm.max()) if len(y_norm) else 0.0
        self._fast = scan.FastRows(
            source, self.device, fast_centre, y_norm, sq_norms, y_max, dropped, self.database_block_size
        )
        # values float32 cannot hold (a row near 1e19 or beyond): every query goes through the float64 pass
        self._overflow = not (y_max * y_max * 4 < bounds.FLOAT32_SAFE_SQ)
        # the float32 pass's per-row bias (its Y^2 part of the bound folded in), +inf for dropped rows
        c_yy = bounds.expansion_model(self.dim, centred=fast_centre is not None).c_yy
        bias = (sq_norms - c_yy * sq_norms).to(torch.float32)
        if dropped is not None:
            bias[dropped.to(bias.device)] = torch.inf
        screen = None
        if self.backend == "torch-bf16" and source.held and screen_copy and self.num_rows and not self._overflow:
            width = bounds.screen_width(self.dim)
            screen = torch.empty(self.num_rows, width, dtype=torch.bfloat16, device=self.device)
            for j, rows in self._fast.blocks():
                screen[j : j + len(rows)] = scan.screen_rows(rows, sq_norms[j : j + len(rows)])
        self._int8: int8.Int8Rows | None = None
        if codes is not None and self.num_rows and not self._overflow:
            self._int8 = codes.finish(self._row_ids, dropped)
        self._passes = scan.FastPasses(
            self._fast,
            dim=self.dim,
            block_size=self.block_size,
            bias32=bias,
            screen_copy=screen,
            screen_on=self.backend == "torch-bf16",
            overflow=self._overflow,
        )

    @property
    def _mean(self) -> Tensor | None:
        """The float32 centre of the fast passes (None: not centred)."""
        return self._fast.centre

    def _attach_faiss(self) -> None:
        """(Re)create the faiss handles, which are neither picklable nor copyable."""
        self._faiss: Any = None
        self._faiss_res: Any = None
        if self.backend.startswith("faiss"):
            self._faiss = import_faiss()
            if self._faiss is None:
                raise ImportError(f"this index was built with backend={self.backend!r} but faiss is not installed.")
            if self.backend == "faiss-gpu":  # pragma: no cover - needs a GPU build of faiss
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
        if bool(((idx < 0) | (idx >= self.num_rows)).any()):
            raise config_error(f"indices must lie in [0, {self.num_rows}).")
        rows = self.row_source.gather(idx.to(source_device(self.row_source)))
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
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_train:
            raise config_error(f"k must be an int in [1, num_train={self.num_train}]; got {k!r}.")
        d2, indices = self.search_squared(self.prepare_queries(queries, name), k)
        return d2.sqrt().to(torch.float32), indices

    def _search(self, queries: Tensor, k: int, name: str) -> tuple[Tensor, Tensor]:
        """:meth:`search` with the queries' name for error messages (used by the memorization metrics)."""
        return self.search(queries, k, name=name)

    def prepare_queries(self, queries: Tensor, name: str = "queries") -> Tensor:
        """Checked, ``feature_fn``-mapped, flattened float32 queries ``(m, dim)`` on :attr:`device`."""
        queries = check_batch(queries, name)
        with torch.no_grad():
            parts = [
                self._prepare(queries[i : i + self.block_size].detach(), name)
                for i in range(0, len(queries), self.block_size)
            ]
        return torch.cat(parts)

    def search_squared(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact squared distances (float64) and original row indices of the ``k`` nearest rows of prepared
        queries ``q`` (:meth:`prepare_queries`); ``k`` may exceed :attr:`num_train` (missing: ``inf``, ``-1``).

        One scan of the training set collects every candidate (see :mod:`.scan`); the candidates get exact
        distances. Sets :attr:`last_search`.
        """
        m = len(q)
        kk = min(k, self.num_train)
        d2 = torch.full((m, k), torch.inf, dtype=torch.float64, device=self.device)
        indices = torch.full((m, k), -1, dtype=torch.int64, device=self.device)
        if kk == 0 or m == 0:
            return d2, indices
        seconds: dict[str, float] = {}
        rescans = 0
        with torch.no_grad():
            x = self._fast.centred(q)
            x_sq = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
            x_norm = x_sq.sqrt()
            safe = ((x_norm + self._fast.y_max) ** 2 < bounds.FLOAT32_SAFE_SQ) & (not self._overflow)
            fast_rows, slow_rows = safe.nonzero().flatten(), (~safe).nonzero().flatten()
            pq, pt = [], []
            if len(fast_rows):
                start = time.perf_counter()
                sel = slice(None) if len(fast_rows) == m else fast_rows
                a, b, rescans = self._fast_pass(q[sel], x[sel], x_sq[sel], x_norm[sel], kk)
                pq.append(fast_rows[a])
                pt.append(b)
                seconds["scan"] = time.perf_counter() - start
            if len(slow_rows):
                start = time.perf_counter()
                a, b = self._passes.float64(q[slow_rows], kk)
                pq.append(slow_rows[a])
                pt.append(b)
                seconds["float64"] = time.perf_counter() - start
            start = time.perf_counter()
            pair_q, pair_t = torch.cat(pq), torch.cat(pt)
            pair_d2 = exact.pair_distances(self.row_source, q, pair_q, pair_t, self.device)
            found_d2, found_idx = exact.best_per_query(m, kk, pair_q, pair_t, pair_d2)
            seconds["rerank"] = time.perf_counter() - start
        counts = torch.bincount(pair_q, minlength=m)
        self.last_search = SearchStats(
            queries=m,
            certified_at_once=int((counts == kk).sum()),
            candidates=len(pair_q),
            scans=int(len(fast_rows) > 0) + int(len(slow_rows) > 0),
            float64_queries=len(slow_rows),
            rescanned_blocks=rescans,
            seconds=seconds,
        )
        if self._row_ids is not None:
            found_idx = self._row_ids[found_idx]
        d2[:, :kk], indices[:, :kk] = found_d2, found_idx
        self.num_searched += m
        return d2, indices

    # ------------------------------------------------------------------------------------------ fast passes
    def _fast_pass(self, q: Tensor, x: Tensor, x_sq: Tensor, x_norm: Tensor, k: int) -> tuple[Tensor, Tensor, int]:
        """Candidate pairs (query, row) of the backend's fast pass, and the blocks it re-scored in float32."""
        if self._int8 is not None:
            return int8.int8_scan(self._passes, self._int8, q, x, x_sq, x_norm, k)
        if self.backend == "torch-bf16":
            return (*self._passes.screen(x, x_sq, x_norm, k), 0)
        if self.backend.startswith("faiss"):
            return self._passes.faiss(self._faiss, self._faiss_res, x, x_sq, x_norm, k)
        return (*self._passes.float32(x, x_sq, x_norm, k), 0)

    def _all_bounds(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """The fast pass's bounds on every squared distance (for the property tests, see :mod:`.scan`)."""
        if self._int8 is not None:
            codes, code_sq, r_x = int8.quantize(q, self._int8.centre, self._int8.scale, self._int8.limit)
            parts = [
                int8.int8_bounds(self._int8, codes, code_sq, r_x, j, self._int8.block(rows, j))
                for j, rows in self._fast.blocks(centred=False)
            ]
            lower, upper = (torch.cat([p[i] for p in parts], dim=1) for i in (0, 1))
            if self._fast.dropped is not None:
                lower[:, self._fast.dropped], upper[:, self._fast.dropped] = torch.inf, torch.inf
            return lower, upper
        return self._passes.all_bounds(q, self._faiss)

    # ---------------------------------------------------------------------------------------------- queries
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
