"""The fast passes: one scan of the training set per search, collecting candidates under a running threshold.

Each pass (float32 GEMM, faiss, split-bfloat16 screen, float64 for values float32 cannot hold) produces, per
block of queries and block of training rows, *lower bounds* on the squared distances (see :mod:`.bounds`).
A :class:`Candidates` per block of queries keeps the ``k`` smallest *upper* bounds seen so far; the ``k``-th
of them, ``T``, is at least the true ``k``-th distance, and it only falls as the scan goes on. Every row whose
lower bound is at most ``T`` when its block is scanned is kept as a candidate, and candidates whose lower bound
exceeds the final ``T`` are dropped. A row never kept had a lower bound above a value at least the true
``k``-th distance: it is strictly farther than the ``k``-th neighbour, so the exact re-ranking of the
candidates (:mod:`.exact`) is the exact answer, without a second scan.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_memwatch.metrics.knn.backends import float32_tile_kernel, matmul_input_unit, onednn_gemm
from lightning_memwatch.metrics.knn.bounds import (
    FLOAT32_SAFE_SQ,
    ErrorModel,
    expansion_model,
    faiss_model,
    screen_model,
    screen_width,
)
from lightning_memwatch.metrics.knn.rows import HeldRows

__all__ = [
    "Candidates",
    "FastPasses",
    "FastRows",
    "float32_screen_output",
    "screen_queries",
    "screen_rows",
    "smallest_k",
    "split3",
]

# Approximate candidates taken per tile before the threshold test (more only where the threshold asks).
TILE_SLACK = 4
# faiss' top lists are k + this long (its selection slows with k); a block whose list may miss candidates of a
# query is scored again with the float32 tile for that query.
FAISS_SLACK = 1
# Candidates kept per query beyond which the kept list is pruned against the current threshold.
_PRUNE_EVERY = 4096


@dataclass
class FastRows:
    """The training rows as the fast passes see them, with their norms.

    Attributes:
        source: the rows (held or streamed).
        device: where the passes run.
        centre: float32 centre subtracted from rows and queries, or None.
        y_norm: float64 norm of every fast row (0 for a dropped duplicate).
        y_sq: float64 squared norm of every fast row (``inf`` for a dropped duplicate).
        y_max: the largest ``y_norm``.
        dropped: streamed duplicates masked out of every pass, or None.
        block_rows: training rows per block.
    """

    source: HeldRows
    device: torch.device
    centre: Tensor | None
    y_norm: Tensor
    y_sq: Tensor
    y_max: float
    dropped: Tensor | None
    block_rows: int

    def blocks(self, centred: bool = True) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows)`` over the training set; centred rows come in one reused buffer."""
        n, step = self.source.n, self.block_rows
        buffer = None
        if centred and self.centre is not None:
            buffer = torch.empty(min(step, n), self.source.dim, device=self.device)
        for j in range(0, n, step):
            rows = self.source.block(j, min(j + step, n), self.device).to(self.device)
            if buffer is not None:
                rows = torch.sub(rows, self.centre, out=buffer[: len(rows)])
            yield j, rows

    def centred(self, q: Tensor) -> Tensor:
        return q if self.centre is None else q - self.centre

    def mask_dropped(self, tile: Tensor, start: int) -> None:
        if self.dropped is not None:
            tile[:, self.dropped[start : start + tile.shape[1]].to(tile.device)] = torch.inf


# Columns per group of :func:`smallest_k` (measured best at 32-64 on a 1,024 x 4,096 tile).
SMALLEST_K_GROUP = 64


def smallest_k(tile: Tensor, kc: int) -> tuple[Tensor, Tensor]:
    """The ``kc`` smallest values of each row of ``tile`` and their columns, unsorted: ``torch.topk`` over the
    columns of the ``kc`` groups (of :data:`SMALLEST_K_GROUP`) with the smallest minima. Those groups hold a set
    of ``kc`` smallest values: any value outside them is at least the ``kc``-th smallest group minimum, and the
    ``kc`` group minima are ``kc`` values no larger. On a 1,024 x 4,096 tile it takes 2.4 ms against 4.7 ms for
    ``topk`` on the whole row (2 threads, Zen 4). Ties may pick other columns than ``topk``; the values are the
    same. CPU only (measured there; on CUDA its NaN check would wait for the device at every tile)."""
    b, n = tile.shape
    group = SMALLEST_K_GROUP
    if tile.device.type != "cpu" or n % group or n // group <= kc:
        return torch.topk(tile, kc, dim=1, largest=False, sorted=False)
    groups = tile.reshape(b, n // group, group)
    minima = groups.amin(dim=2)  # NaN where a group holds one: then topk over the rows, which orders NaN last
    if minima.is_floating_point() and bool(minima.isnan().any()):
        return torch.topk(tile, kc, dim=1, largest=False, sorted=False)
    chosen = torch.topk(minima, kc, dim=1, largest=False, sorted=False).indices
    columns = torch.gather(groups, 1, chosen[:, :, None].expand(b, kc, group)).reshape(b, kc * group)
    vals, pos = torch.topk(columns, kc, dim=1, largest=False, sorted=False)
    return vals, chosen.gather(1, pos // group) * group + pos % group


class Candidates:
    """Running threshold and kept candidates of one block of queries (see the module notes).

    Args:
        k: neighbours per query.
        x_norm: float64 norms of the queries as the pass sees them, ``(b,)``.
    """

    def __init__(self, k: int, x_norm: Tensor) -> None:
        b, device = len(x_norm), x_norm.device
        self.k = k
        self.x_norm = x_norm
        self.best_upper = torch.full((b, k), torch.inf, dtype=torch.float64, device=device)
        self.threshold = torch.full((b,), torch.inf, dtype=torch.float64, device=device)
        self._q: list[Tensor] = []
        self._t: list[Tensor] = []
        self._lower: list[Tensor] = []
        self._kept = 0
        self._pruned_at = 0

    def offer(self, upper: Tensor) -> None:
        """Lower the threshold with upper bounds ``(b, c)`` of distinct rows not offered before."""
        both = torch.cat([self.best_upper, upper.nan_to_num(nan=torch.inf)], dim=1)
        self.best_upper = torch.topk(both, self.k, dim=1, largest=False, sorted=False).values
        self.threshold = self.best_upper.max(dim=1).values

    def tile_threshold(self, cq: Tensor, dtype: torch.dtype) -> Tensor:
        """``T - cq`` in the tile's dtype, rounded up (so that the test never drops a candidate)."""
        thr = self.threshold - cq
        if dtype == torch.float64:
            return thr
        thr32 = thr.to(dtype)
        return torch.nextafter(thr32, torch.full_like(thr32, torch.inf))

    def add_tile(self, tile: Tensor, start: int, y_norm: Tensor, cq: Tensor, model: ErrorModel, y_max: float) -> None:
        """Take the candidates of one tile of lower bounds minus ``cq``, ``(b, rows)``; ``y_norm`` of its rows."""
        b, rows = tile.shape
        kc = min(self.k + TILE_SLACK, rows)
        vals, loc = smallest_k(tile, kc)
        lower = vals.to(torch.float64) + cq[:, None]
        eps = model.eps(self.x_norm[:, None], y_norm[loc], y_max)
        self.offer(model.upper_from_lower(lower, eps))
        thr = self.tile_threshold(cq, tile.dtype)
        full = (vals.max(dim=1).values <= thr) if kc < rows else torch.zeros(b, dtype=torch.bool, device=tile.device)
        qi, ci = ((vals <= thr[:, None]) & ~full[:, None]).nonzero(as_tuple=True)
        self.keep(qi, loc[qi, ci] + start, lower[qi, ci])
        if bool(full.any()):
            sel = full.nonzero().flatten()
            sub = tile[sel]
            qi, ti = (sub <= thr[sel, None]).nonzero(as_tuple=True)
            self.keep(sel[qi], ti + start, sub[qi, ti].to(torch.float64) + cq[sel[qi]])

    def keep(self, q: Tensor, t: Tensor, lower: Tensor) -> None:
        """Keep pairs (query of this block, row, lower bound of the squared distance)."""
        if len(q) == 0:
            return
        self._q.append(q)
        self._t.append(t)
        self._lower.append(lower)
        self._kept += len(q)
        if self._kept > 2 * self._pruned_at + _PRUNE_EVERY:
            self._prune()

    def _prune(self) -> None:
        q, t, lower = torch.cat(self._q), torch.cat(self._t), torch.cat(self._lower)
        keep = ~(lower > self.threshold[q])  # NaN kept (never happens on the guarded passes)
        self._q, self._t, self._lower = [q[keep]], [t[keep]], [lower[keep]]
        self._kept = self._pruned_at = int(keep.sum())

    def result(self) -> tuple[Tensor, Tensor]:
        """The candidate pairs ``(query of this block, row)`` under the final threshold."""
        device = self.threshold.device
        if not self._q:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty
        self._prune()
        return self._q[0], self._t[0]


# ------------------------------------------------------------------------------ split-bfloat16 screen
def split3(v: Tensor) -> Tensor:
    """float64 ``v`` as three bfloat16 parts whose sum is ``v`` to about 2**-24 relative, ``(len, 3)``."""
    a = v.to(torch.bfloat16)
    r = v - a.to(torch.float64)
    b = r.to(torch.bfloat16)
    r = r - b.to(torch.float64)
    return torch.stack([a, b, r.to(torch.bfloat16)], dim=1)


def screen_rows(rows: Tensor, y_sq: Tensor) -> Tensor:
    """Screening rows ``[hi, lo, hi, -||t||^2/2 in 3 parts, 1, 1, 1, 0...]`` in bfloat16 (rows already centred)."""
    d = rows.shape[1]
    out = torch.zeros(len(rows), screen_width(d), dtype=torch.bfloat16, device=rows.device)
    hi = rows.to(torch.bfloat16)
    out[:, :d] = hi
    out[:, d : 2 * d] = (rows - hi.to(torch.float32)).to(torch.bfloat16)
    out[:, 2 * d : 3 * d] = hi
    out[:, 3 * d : 3 * d + 3] = split3(-torch.where(torch.isfinite(y_sq), y_sq, 0.0) / 2)
    out[:, 3 * d + 3 : 3 * d + 6] = 1
    return out


def screen_queries(x: Tensor, x_sq: Tensor) -> Tensor:
    """Screening queries ``[hi, hi, lo, 1, 1, 1, -||x||^2/2 in 3 parts, 0...]`` in bfloat16."""
    d = x.shape[1]
    out = torch.zeros(len(x), screen_width(d), dtype=torch.bfloat16, device=x.device)
    hi = x.to(torch.bfloat16)
    out[:, :d] = hi
    out[:, d : 2 * d] = hi
    out[:, 2 * d : 3 * d] = (x - hi.to(torch.float32)).to(torch.bfloat16)
    out[:, 3 * d : 3 * d + 3] = 1
    out[:, 3 * d + 3 : 3 * d + 6] = split3(-x_sq / 2)
    return out


@functools.lru_cache(maxsize=8)
def float32_screen_output(device: torch.device) -> bool:
    """Whether the screen's GEMM returns its float32 accumulator: CUDA with ``torch.mm(..., out_dtype=...)``
    (torch 2.9 and later); elsewhere the result is rounded to bfloat16 (the bound's ``rho``, see
    :mod:`.bounds`)."""
    if device.type != "cuda":
        return False
    try:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32  # type: ignore[call-arg]
    except (TypeError, RuntimeError):  # pragma: no cover - older torch
        return False


def screen_mm(qs: Tensor, rows: Tensor, float32_output: bool) -> Tensor:
    """``qs @ rows.T``: bfloat16 inputs, float32 accumulation; the float32 accumulator where asked for.

    On CPU the float32 accumulator comes from a float32 GEMM of the bfloat16 values (products of bfloat16
    numbers are exact in float32): the same arithmetic the CUDA path assumes, which the property tests use.
    """
    if float32_output and qs.device.type != "cuda":
        return torch.mm(qs.to(torch.float32), rows.to(torch.float32).T)
    if float32_output:
        return torch.mm(qs, rows.T, out_dtype=torch.float32)  # type: ignore[call-arg]
    return torch.mm(qs, rows.T)


@contextlib.contextmanager
def float32_accumulation(device: torch.device) -> Iterator[None]:
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


def faiss_block(
    faiss: Any, q: Tensor, rows: Tensor, norms: Tensor, c: int, gpu_res: Any = None
) -> tuple[Tensor, Tensor]:
    """faiss' ``c`` smallest approximate squared distances (float32) and local rows of one block of rows."""
    if gpu_res is not None:  # pragma: no cover - needs a GPU build of faiss
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

        device = q.device.index if q.device.index is not None else torch.cuda.current_device()
        return faiss.knn_gpu(gpu_res, q.contiguous(), rows.contiguous(), c, device=device)
    q_np, rows = q.contiguous().numpy(), rows.contiguous()
    dist = torch.empty(len(q), c, dtype=torch.float32)
    cand = torch.empty(len(q), c, dtype=torch.int64)
    faiss.knn_L2sqr(
        faiss.swig_ptr(q_np),
        faiss.swig_ptr(rows.numpy()),
        rows.shape[1],
        len(q),
        len(rows),
        c,
        faiss.swig_ptr(dist.numpy()),
        faiss.swig_ptr(cand.numpy()),
        faiss.swig_ptr(norms.contiguous().numpy()),
    )
    return dist, cand


# ------------------------------------------------------------------------------------------ the passes
class FastPasses:
    """The fast passes over one index's rows; each returns the candidate pairs ``(query, row)`` of its scan.

    Args:
        fast: the rows as the passes see them.
        dim: row length. block_size: queries per block.
        bias32: the float32 pass's per-row bias (``+inf`` for dropped rows).
        screen_copy: the bfloat16 screening copy of held rows, or None (made per block).
        screen_on: whether the backend is the split-bfloat16 screen.
        overflow: whether some row holds values float32 cannot (every query then takes the float64 pass).
    """

    def __init__(
        self,
        fast: FastRows,
        *,
        dim: int,
        block_size: int,
        bias32: Tensor,
        screen_copy: Tensor | None,
        screen_on: bool,
        overflow: bool,
    ) -> None:
        self.fast, self.dim, self.block_size = fast, dim, block_size
        self.device = fast.device
        self.bias32, self.screen_copy, self.screen_on, self.overflow = bias32, screen_copy, screen_on, overflow
        # the screen reads its GEMM's float32 accumulator where torch gives it (CUDA), else a bfloat16 result
        self.screen_float32_output = float32_screen_output(self.device)

    def expansion(self) -> ErrorModel:
        """The float32 pass's error model under torch's current matmul precision."""
        return expansion_model(self.dim, centred=self.fast.centre is not None, unit_in=matmul_input_unit(self.device))

    @staticmethod
    def cq(model: ErrorModel, x_sq: Tensor, x_norm: Tensor, y_max: float, has_x_sq: bool) -> Tensor:
        """The per-query part of the lower bound that the tile leaves out (see :mod:`.bounds`)."""
        cq = -(model.c_xx * x_sq + model.tiny * (1 + x_norm + y_max))
        return cq + x_sq if has_x_sq else cq

    def float32_tile(self, xb: Tensor, coef: Tensor, j: int, rows: Tensor, out: Tensor | None) -> Tensor:
        """``fl(b_t - 2 x.y) - c_xy X Y`` for one block of queries and rows (lower bound minus ``cq``); by
        oneDNN's GEMM on ``-2 x`` (a power-of-two scaling, exact) where it is the faster one here
        (:func:`~lightning_memwatch.metrics.knn.backends.float32_tile_kernel`), else ``addmm``."""
        bias = self.bias32[j : j + len(rows)]
        if float32_tile_kernel(self.device) == "onednn":
            tile = onednn_gemm(xb * -2, rows, bias)
        else:
            tile = torch.addmm(bias, xb, rows.T, beta=1, alpha=-2, out=out)
        return tile.addr_(coef, self.fast.y_norm[j : j + len(rows)].to(torch.float32), alpha=-1)

    def collectors(self, x_norm: Tensor, k: int) -> list[Candidates]:
        return [Candidates(k, x_norm[i : i + self.block_size]) for i in range(0, len(x_norm), self.block_size)]

    def pairs(self, collectors: list[Candidates]) -> tuple[Tensor, Tensor]:
        qs, ts = [], []
        for b, coll in enumerate(collectors):
            q, t = coll.result()
            qs.append(q + b * self.block_size)
            ts.append(t)
        return torch.cat(qs), torch.cat(ts)

    def float32(self, x: Tensor, x_sq: Tensor, x_norm: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The float32 GEMM pass (``backend="torch"``) over fast queries ``x`` with their float64 norms."""
        fast, bs = self.fast, self.block_size
        model = self.expansion()
        cq = self.cq(model, x_sq, x_norm, fast.y_max, True)
        coef = (model.c_xy * x_norm).to(torch.float32)
        colls = self.collectors(x_norm, k)
        tile = torch.empty(min(bs, len(x)), min(fast.block_rows, self.fast.source.n), device=self.device)
        for j, rows in fast.blocks():
            for b, coll in enumerate(colls):
                i = b * bs
                xb = x[i : i + bs]
                out = tile if tile.shape == (len(xb), len(rows)) else None
                t = self.float32_tile(xb, coef[i : i + bs], j, rows, out)
                coll.add_tile(t, j, fast.y_norm[j : j + len(rows)], cq[i : i + bs], model, fast.y_max)
        return self.pairs(colls)

    def screen(self, x: Tensor, x_sq: Tensor, x_norm: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The split-bfloat16 screen (``backend="torch-bf16"``)."""
        fast, bs = self.fast, self.block_size
        f32_out = self.screen_float32_output
        model = screen_model(
            self.dim, centred=self.fast.centre is not None, float32_output=f32_out, cuda=self.device.type == "cuda"
        )
        cq = self.cq(model, x_sq, x_norm, fast.y_max, False)
        coef = (model.c_xy * x_norm).to(torch.float32)
        scale = -2 * (1 - model.rho)
        qs = screen_queries(x, x_sq)
        colls = self.collectors(x_norm, k)
        with float32_accumulation(self.device):
            for j, rows in fast.blocks():
                stop = j + len(rows)
                srows = (
                    self.screen_copy[j:stop] if self.screen_copy is not None else screen_rows(rows, fast.y_sq[j:stop])
                )
                y32 = fast.y_norm[j:stop].to(torch.float32)
                yy = (model.c_yy * fast.y_sq[j:stop]).to(torch.float32)
                for b, coll in enumerate(colls):
                    i = b * bs
                    out = screen_mm(qs[i : i + bs], srows, f32_out)
                    tile = out.to(torch.float32).mul_(scale) if not f32_out else out.mul_(scale)
                    tile.sub_(yy).addr_(coef[i : i + bs], y32, alpha=-1)
                    fast.mask_dropped(tile, j)
                    coll.add_tile(tile, j, fast.y_norm[j:stop], cq[i : i + bs], model, fast.y_max)
        return self.pairs(colls)

    def faiss(
        self, faiss: Any, gpu_res: Any, x: Tensor, x_sq: Tensor, x_norm: Tensor, k: int
    ) -> tuple[Tensor, Tensor, int]:
        """faiss' top lists per block of rows; a block whose top list might miss candidates of some queries is
        scored again for those with the float32 tile (it is in memory: no second scan)."""
        fast = self.fast
        gpu = gpu_res is not None
        model = faiss_model(self.dim, centred=self.fast.centre is not None, unit_in=2.0**-11 if gpu else 0.0)
        tile_model = self.expansion()
        cq_t = self.cq(tile_model, x_sq, x_norm, fast.y_max, True)
        coef = (tile_model.c_xy * x_norm).to(torch.float32)
        coll = Candidates(k, x_norm)
        rescans = 0
        for j, rows in fast.blocks():
            stop = j + len(rows)
            dropped = None if fast.dropped is None else fast.dropped[j:stop].to(self.device)
            extra = 0 if dropped is None else int(dropped.sum())
            kc = min(k + FAISS_SLACK + extra, len(rows))
            norms = fast.y_sq[j:stop].to(torch.float32)
            dist, lab = faiss_block(faiss, x, rows, norms, kc, gpu_res)
            approx = dist.to(torch.float64)
            # rows outside the top list are at least as far (approximately) as its last row
            last = approx.nan_to_num(nan=torch.inf).max(dim=1).values
            if dropped is not None and extra:
                approx[dropped[lab.clamp_min(0)]] = torch.inf
            approx[lab < 0] = torch.inf
            y_lab = fast.y_norm[j:stop][lab.clamp_min(0)]
            eps = model.eps(x_norm[:, None], y_lab, fast.y_max)
            lower = model.lower(approx, eps)
            coll.offer(model.upper_from_lower(lower, eps))
            threshold = coll.threshold
            y_block = float(fast.y_norm[j:stop].max())
            unseen = last - model.eps(x_norm, y_block, fast.y_max)  # type: ignore[arg-type]
            full = ~(unseen > threshold) if kc < len(rows) else torch.zeros(len(x), dtype=torch.bool, device=x.device)
            qi, ci = (~(lower > threshold[:, None]) & ~full[:, None] & (lab >= 0)).nonzero(as_tuple=True)
            coll.keep(qi, lab[qi, ci] + j, lower[qi, ci])
            if bool(full.any()):
                rescans += 1
                sel = full.nonzero().flatten()
                tile = self.float32_tile(x[sel], coef[sel], j, rows, None)
                thr = coll.tile_threshold(cq_t, torch.float32)[sel]
                qi, ti = (tile <= thr[:, None]).nonzero(as_tuple=True)
                coll.keep(sel[qi], ti + j, tile[qi, ti].to(torch.float64) + cq_t[sel[qi]])
        q, t = coll.result()
        return q, t, rescans

    def float64(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The same scan in float64 on the raw rows, for queries (or rows) float32 cannot hold."""
        model = expansion_model(self.dim, centred=False, float64=True)
        q64 = q.to(torch.float64)
        x_sq = (q64 * q64).sum(dim=1)
        x_norm = x_sq.sqrt()
        colls = self.collectors(x_norm, k)
        bs = self.block_size
        for j, rows in self.fast.blocks(centred=False):
            r64 = rows.to(torch.float64)
            y_sq = (r64 * r64).sum(dim=1)
            y_norm = y_sq.sqrt()
            y_max = float(y_norm.max())
            bias = y_sq - model.c_yy * y_sq
            if self.fast.dropped is not None:
                bias[self.fast.dropped[j : j + len(rows)].to(bias.device)] = torch.inf
            cq = self.cq(model, x_sq, x_norm, y_max, True)
            for b, coll in enumerate(colls):
                i = b * bs
                tile = torch.addmm(bias, q64[i : i + bs], r64.T, beta=1, alpha=-2)
                tile.addr_(model.c_xy * x_norm[i : i + bs], y_norm, alpha=-1)
                coll.add_tile(tile, j, y_norm, cq[i : i + bs], model, y_max)
        return self.pairs(colls)

    def all_bounds(self, q: Tensor, faiss: Any) -> tuple[Tensor, Tensor]:
        """Lower and upper bounds of the backend's fast pass on every squared distance, ``(m, num_rows)``
        float64 (for the property tests of the bounds; dropped rows ``inf``)."""
        fast = self.fast
        x = fast.centred(q)
        x_sq = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()
        x_norm = x_sq.sqrt()
        lower = torch.empty(len(q), self.fast.source.n, dtype=torch.float64, device=self.device)
        upper = torch.empty_like(lower)
        if self.overflow or bool(((x_norm + fast.y_max) ** 2 >= FLOAT32_SAFE_SQ).any()):
            raise ValueError("values beyond float32: the float64 pass is used")
        if faiss is not None:
            model = faiss_model(self.dim, centred=self.fast.centre is not None)
            for j, rows in fast.blocks():
                dist, lab = faiss_block(faiss, x, rows, fast.y_sq[j : j + len(rows)].float(), len(rows))
                eps = model.eps(x_norm[:, None], fast.y_norm[j : j + len(rows)][lab], fast.y_max)
                low = model.lower(dist.double(), eps)
                lower[:, j : j + len(rows)].scatter_(1, lab, low)
                upper[:, j : j + len(rows)].scatter_(1, lab, model.upper_from_lower(low, eps))
            return lower, upper
        screen = self.screen_on
        f32_out = self.screen_float32_output
        model = (
            screen_model(self.dim, centred=self.fast.centre is not None, float32_output=f32_out, cuda=False)
            if screen
            else self.expansion()
        )
        cq = self.cq(model, x_sq, x_norm, fast.y_max, not screen)
        coef = (model.c_xy * x_norm).to(torch.float32)
        for j, rows in fast.blocks():
            stop = j + len(rows)
            if screen:
                out = screen_mm(screen_queries(x, x_sq), screen_rows(rows, fast.y_sq[j:stop]), f32_out)
                tile = out.to(torch.float32).mul_(-2 * (1 - model.rho))
                tile.sub_((model.c_yy * fast.y_sq[j:stop]).float()).addr_(coef, fast.y_norm[j:stop].float(), alpha=-1)
            else:
                tile = self.float32_tile(x, coef, j, rows, None)
            low = tile.double() + cq[:, None]
            eps = model.eps(x_norm[:, None], fast.y_norm[None, j:stop], fast.y_max)
            lower[:, j:stop], upper[:, j:stop] = low, model.upper_from_lower(low, eps)
        return lower, upper
